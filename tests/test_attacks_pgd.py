"""PGD: stays in the threat model, raises the loss, is deterministic per seed."""

import numpy as np
import pytest
import tensorflow as tf

from keras_arat.attacks import PGD, core
from tests import helpers

ATOL = 1e-6  # float32 projection overshoots eps by ~3e-8


@pytest.fixture(scope="module")
def net_and_data():
    net = helpers.tiny_network(split_bn=False, trained=True)
    x, y = helpers.tiny_data().test
    return net, x[:64], y[:64]


def predict(net):
    return lambda z: net(z, training=False, branch="adv")


@pytest.mark.parametrize("norm,eps,step", [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.125)])
def test_pgd_stays_in_ball_and_box(net_and_data, norm, eps, step):
    net, x, y = net_and_data
    x_adv = PGD(eps=eps, step_size=step, steps=5, norm=norm)(predict(net), x, y,
                                                           tf.constant([1, 2], tf.int64))
    x_adv = x_adv.numpy()
    delta = (x_adv - x).reshape(len(x), -1)
    if norm == "linf":
        assert np.abs(delta).max() <= eps + ATOL
    else:
        assert np.linalg.norm(delta, axis=1).max() <= eps + ATOL
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert np.abs(delta).max() > 0.5 * (eps if norm == "linf" else step / 10)


def test_pgd_raises_loss_and_lowers_accuracy(net_and_data):
    net, x, y = net_and_data
    f = predict(net)
    x_adv = PGD(eps=0.3, step_size=0.075, steps=10)(f, x, y, tf.constant([0, 0], tf.int64))
    clean_loss = core.cross_entropy(f(x), y).numpy()
    adv_loss = core.cross_entropy(f(x_adv), y).numpy()
    assert adv_loss.mean() > clean_loss.mean() + 0.5
    clean_acc = np.mean(np.argmax(f(x), -1) == y)
    adv_acc = np.mean(np.argmax(f(x_adv), -1) == y)
    assert clean_acc >= 0.5 and adv_acc < clean_acc - 0.3


def test_pgd_is_deterministic_per_seed(net_and_data):
    net, x, y = net_and_data
    attack = PGD(eps=8 / 255, step_size=2 / 255, steps=3)
    a = attack(predict(net), x, y, tf.constant([5, 7], tf.int64)).numpy()
    b = attack(predict(net), x, y, tf.constant([5, 7], tf.int64)).numpy()
    c = attack(predict(net), x, y, tf.constant([5, 8], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_projection_is_exact():
    x = tf.constant(np.full((2, 2, 2, 1), 0.5, np.float32))
    x_adv = x + tf.constant(np.array([0.9, -0.9, 0.01, -0.02] * 2, np.float32).reshape(2, 2, 2, 1))
    out = core.project(x_adv, x, 0.1).numpy().ravel()
    np.testing.assert_allclose(out, [0.6, 0.4, 0.51, 0.48] * 2, atol=ATOL)
    out = core.project(x + 3.0, x, 0.8).numpy()
    np.testing.assert_allclose(out, 1.0, atol=ATOL)  # ball reaches past 1: box wins


def test_losses_by_hand():
    logits = tf.constant([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    y = tf.constant([0, 2])
    p = np.exp([[2, 0, -1], [0, 3, 1]]) / np.exp([[2, 0, -1], [0, 3, 1]]).sum(1, keepdims=True)
    np.testing.assert_allclose(core.cross_entropy(logits, y), -np.log([p[0, 0], p[1, 2]]),
                               rtol=1e-6)
    np.testing.assert_allclose(core.cw_margin(logits, y), [0.0 - 2.0, 3.0 - 1.0], rtol=1e-6)
    q = tf.nn.softmax(tf.constant([[1.0, 1.0, 1.0], [0.0, 3.0, 1.0]]))
    kl = (q.numpy() * (np.log(q.numpy()) - np.log(p))).sum(1)
    np.testing.assert_allclose(core.kl_to_target(logits, q), kl, rtol=1e-5, atol=1e-7)
    assert abs(float(core.kl_to_target(logits, tf.nn.softmax(logits))[0])) < 1e-6


def test_bad_attack_settings_raise():
    with pytest.raises(ValueError, match="norm"):
        PGD(eps=0.1, step_size=0.1, steps=1, norm="l3")
    with pytest.raises(ValueError, match="steps"):
        PGD(eps=0.1, step_size=0.1, steps=0)


def test_every_reported_batch_is_checked_against_the_threat_model(net_and_data):
    import dataclasses

    from keras_arat.attacks import AutoAttack, BudgetError, check_adversarial, run_attack
    net, x, y = net_and_data
    eps = 0.1
    # Rounding of the projection passes; anything beyond 1e-6 is an error, not a figure.
    check_adversarial(np.clip(x + eps + 3e-8, 0, 1), x, eps)
    with pytest.raises(BudgetError, match="more than eps"):
        check_adversarial(np.clip(x + eps + 1e-5, 0, 1), x, eps)
    with pytest.raises(BudgetError, match=r"outside \[0, 1\]"):
        check_adversarial(x - 1e-4, x, eps)
    with pytest.raises(BudgetError, match="non-finite"):
        check_adversarial(np.where(x > 0.5, np.nan, x), x, eps)
    with pytest.raises(BudgetError, match="more than eps"):  # L2: per-example norm
        check_adversarial(np.clip(x + 0.01, 0, 1), x, 0.05, "l2")

    @dataclasses.dataclass(frozen=True)
    class Overshoot:  # a broken attack: one step of 2 eps, never projected
        eps: float
        norm: str = "linf"
        name: str = "overshoot"

        def __call__(self, model_fn, xb, yb, seed):
            return tf.clip_by_value(xb + 2 * self.eps * tf.sign(tf.random.normal(
                tf.shape(xb), seed=1)), 0.0, 1.0)

    with pytest.raises(BudgetError, match="overshoot moved example"):
        run_attack(Overshoot(eps), predict(net), x, y, batch_size=32)
    with pytest.raises(BudgetError):
        AutoAttack(eps=eps, attacks=[Overshoot(eps)]).run(predict(net), x, y, 32)
    # A correct attack's figure is still produced.
    _, correct = run_attack(PGD(eps=eps, step_size=eps / 4, steps=2), predict(net), x, y, batch_size=32)
    assert correct.dtype == bool and correct.shape == (len(x),)
