"""TRADES and MART: losses by hand, and their attacks maximise what the spec says."""

import numpy as np
import pytest
import tensorflow as tf

from keras_arat.attacks import core
from keras_arat.training import MARTModel, PGDATModel, TorchSGD, TRADESModel
from tests import helpers


def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def setup(cls, **kwargs):
    net = helpers.new_network(split_bn=False)
    trainer = cls(net, eps=0.3, step_size=0.075, attack_steps=3, **kwargs)
    trainer.compile(optimizer=TorchSGD(0.01))
    x, y = helpers.tiny_data().train
    return trainer, tf.constant(x[:16]), tf.constant(y[:16])


def fixed_attack(trainer, x):
    x_adv = tf.clip_by_value(x + 0.2, 0.0, 1.0)
    trainer.adversarial = lambda x_, target, branch="adv": x_adv
    return x_adv


def test_trades_loss_by_hand():
    trainer, x, y = setup(TRADESModel, beta=6.0)
    x_adv = fixed_attack(trainer, x)
    loss, logs = trainer.losses_for(x, y)
    net, yn = trainer.network, y.numpy()
    nat = net(x, training=True).numpy().astype(np.float64)
    adv = net(x_adv, training=True).numpy().astype(np.float64)
    p, q = softmax(nat), softmax(adv)
    ce = -np.log(p[np.arange(16), yn]).mean()
    kl = (p * (np.log(p) - np.log(q))).sum(1).mean()
    np.testing.assert_allclose(float(loss), ce + 6.0 * kl, rtol=1e-5)
    np.testing.assert_allclose(float(logs["kl"]), kl, rtol=1e-4, atol=1e-7)


def test_mart_loss_by_hand():
    trainer, x, y = setup(MARTModel, beta=5.0)
    x_adv = fixed_attack(trainer, x)
    loss, _ = trainer.losses_for(x, y)
    net, yn, rows = trainer.network, y.numpy(), np.arange(16)
    p = softmax(net(x, training=True).numpy().astype(np.float64))
    q = softmax(net(x_adv, training=True).numpy().astype(np.float64))
    # Reference: second most likely class if the top one is the label, else the top one.
    order = np.argsort(q, axis=1)
    new_y = np.where(order[:, -1] == yn, order[:, -2], order[:, -1])
    bce = -np.log(q[rows, yn]).mean() - np.log(1.0001 - q[rows, new_y] + 1e-12).mean()
    kl = (p * (np.log(p) - np.log(q + 1e-12))).sum(1)  # the reference: log(p), no 1e-12
    robust = (kl * (1.0000001 - p[rows, yn])).mean()
    np.testing.assert_allclose(float(loss), bce + 5.0 * robust, rtol=1e-5)


def test_trades_attack_maximises_kl_in_inference_mode():
    trainer, x, y = setup(TRADESModel)
    assert trainer.attack.loss is core.kl_to_target and trainer.attack.init == "normal"
    assert trainer.attack_training is False
    net = helpers.tiny_network(split_bn=False, trained=True)
    trainer.network = net
    f = lambda z: net(z, training=False)  # noqa: E731
    p = tf.nn.softmax(f(x))
    x_adv = trainer.adversarial(x, p)
    kl_adv = core.kl_to_target(f(x_adv), p).numpy()
    noise = tf.clip_by_value(x + 0.3 * tf.sign(tf.random.stateless_normal(x.shape, [3, 4])), 0, 1)
    kl_noise = core.kl_to_target(f(noise), p).numpy()
    assert kl_adv.mean() > 2 * kl_noise.mean() and kl_adv.mean() > 0.5
    assert np.abs(x_adv.numpy() - x.numpy()).max() <= 0.3 + 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("cls", [TRADESModel, MARTModel, PGDATModel])
def test_baseline_train_step_lowers_loss(cls):
    trainer, x, y = setup(cls)
    first = trainer.train_on_batch(x, y, return_dict=True)["loss"]
    for _ in range(15):
        last = trainer.train_on_batch(x, y, return_dict=True)["loss"]
    assert np.isfinite(first) and last < first


@pytest.mark.slow
@pytest.mark.parametrize("method", ["arat", "pgd_at", "trades", "mart"])
def test_eps_warmup_grows_the_training_attack_per_step_without_retracing(method):
    from keras_arat.training import TRAINERS
    net = helpers.new_network(split_bn=(method == "arat"))
    trainer = TRAINERS[method](net, eps=0.3, step_size=0.1, attack_steps=3,
                               eps_warmup_steps=6)
    trainer.compile(optimizer=TorchSGD(0.01))
    x, y = helpers.tiny_data().train
    xb = tf.constant(x[:32])
    target = y[:32] if method in ("arat", "pgd_at", "mart") else tf.nn.softmax(net(xb))
    for step in (0, 3, 6, 9):  # eps and step size are 0.3 * min(1, step / 6)
        trainer.optimizer.iterations.assign(step)
        x_adv = trainer.adversarial(xb, target).numpy()
        eps = 0.3 * min(1.0, step / 6)
        moved = np.abs(x_adv - x[:32]).max()
        assert moved <= eps + 1e-6, (step, moved)
        assert moved >= 0.5 * eps, (step, moved)  # the attack does use its budget
    assert trainer.attack.eps == 0.3 and trainer.attack.step_size == 0.1
    # fit: the logged epoch mean of the training eps follows the ramp, and the step is
    # traced once, however many steps change the fraction.
    trainer.optimizer.iterations.assign(0)
    traces = []
    losses_for = trainer.losses_for
    trainer.losses_for = lambda *a: traces.append(1) or losses_for(*a)
    seen = []
    for _ in range(3):
        history = trainer.fit(x[:128], y[:128], batch_size=32, epochs=1, verbose=0,
                              shuffle=False)
        seen.append(history.history["attack_eps"][0])
        if len(seen) == 1:
            traced = len(traces)
    np.testing.assert_allclose(seen, [0.3 * np.mean(np.minimum(1, np.arange(s, s + 4) / 6))
                                      for s in (0, 4, 8)], atol=1e-6)
    assert len(traces) == traced
