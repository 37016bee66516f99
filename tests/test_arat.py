"""ARATModel: the loss is the spec's formula, and stop-gradient isolates the clean branch."""

import numpy as np
import pytest
import tensorflow as tf

from keras_arat.training import ARATModel, PGDATModel, TorchSGD
from keras_arat.training.trainers import pooled_feature
from tests import helpers


def make_trainer(invariance="asymmetric", predictor=True, split_bn=True, **kwargs):
    net = helpers.new_network(split_bn=split_bn)
    trainer = ARATModel(net, invariance=invariance, predictor=predictor, eps=0.3,
                        step_size=0.075, attack_steps=2, **kwargs)
    trainer.compile(optimizer=TorchSGD(0.01))
    return trainer


def batch(n=16):
    x, y = helpers.tiny_data().train
    return tf.constant(x[:n]), tf.constant(y[:n])


def invariance_grads(trainer):
    x, y = batch()
    x_adv = tf.clip_by_value(x + 0.2 * tf.sign(tf.random.stateless_normal(x.shape, [1, 1])), 0, 1)
    net = trainer.network
    with tf.GradientTape() as tape:
        _, feats_c = net(x, training=True, branch="clean", return_features=True)
        _, feats_a = net(x_adv, training=True, branch="adv", return_features=True)
        inv = trainer.invariance_loss(feats_c, feats_a)
    variables = trainer.trainable_variables
    grads = tape.gradient(inv, variables)
    return float(inv), {v.path: (np.zeros(v.shape) if g is None else g.numpy())
                        for v, g in zip(variables, grads)}


def test_invariance_gradient_never_reaches_clean_branch():
    inv, grads = invariance_grads(make_trainer())
    assert inv > 0
    clean = {p: g for p, g in grads.items() if "/clean/" in p}
    adv = {p: g for p, g in grads.items() if "/adv/" in p}
    predictor = {p: g for p, g in grads.items() if "predictor" in p}
    assert len(clean) == len(adv) == 8  # gamma and beta of the 4 split BNs
    for path, g in clean.items():
        assert np.all(g == 0.0), f"{path} got an invariance gradient"
    for path, g in adv.items():
        assert np.abs(g).max() > 0, f"{path} got no invariance gradient"
    assert len(predictor) == 3 * 5  # 3 taps x (fc1 kernel, bn gamma, bn beta, fc2 kernel, bias)
    for path, g in predictor.items():
        assert np.abs(g).max() > 0, f"{path} got no gradient"


def test_symmetric_invariance_reaches_clean_branch():
    _, grads = invariance_grads(make_trainer(invariance="symmetric", predictor=False))
    clean = [g for p, g in grads.items() if "/clean/" in p]
    assert all(np.abs(g).max() > 0 for g in clean)
    assert not any("predictor" in p for p in grads)


def test_weighted_loss_matches_hand_computation():
    trainer = make_trainer(invariance_weight=7.0)
    trainer.a_prev.assign(0.3)
    x, y = batch(8)
    x_adv = tf.clip_by_value(x + 0.25, 0.0, 1.0)
    trainer.adversarial = lambda x_, y_, branch="adv": x_adv
    loss, logs = trainer.losses_for(x, y)

    # The same quantities by hand, from fresh forwards (training mode is
    # deterministic given the batch; BN statistics moving does not change it).
    net, yn = trainer.network, y.numpy()
    lc, fc = net(x, training=True, branch="clean", return_features=True)
    la, fa = net(x_adv, training=True, branch="adv", return_features=True)

    def ce(logits):
        z = logits.numpy().astype(np.float64)
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -logp[np.arange(len(yn)), yn].mean()

    def relu_gap(t):
        t = np.maximum(t.numpy(), 0)
        return t.mean(axis=(1, 2)) if t.ndim == 4 else t

    inv = 0.0
    for i, tap in enumerate(trainer.taps):
        p = trainer.predictors[i](tf.constant(relu_gap(fa[tap])), training=True).numpy()
        z = relu_gap(fc[tap])
        # A ReLU can zero a whole feature vector: its cosine counts as 0, as in
        # torch.nn.functional.cosine_similarity.
        norms = np.maximum(np.linalg.norm(p, axis=1), 1e-6) * np.maximum(
            np.linalg.norm(z, axis=1), 1e-6)
        cos = (p * z).sum(1) / norms
        inv += 1.0 - cos.mean()
    expected = 0.3 * ce(la) + 0.7 * ce(lc) + 7.0 / len(trainer.taps) * inv
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(logs["ce_adv"]), ce(la), rtol=1e-5)
    np.testing.assert_allclose(float(logs["ce_clean"]), ce(lc), rtol=1e-5)
    assert float(logs["a_prev"]) == pytest.approx(0.3)


def test_pooled_feature_is_relu_then_gap():
    t = tf.constant(np.arange(-8, 8, dtype=np.float32).reshape(1, 2, 2, 4))
    np.testing.assert_allclose(pooled_feature(t).numpy(),
                               np.maximum(t.numpy(), 0).mean(axis=(1, 2)))


@pytest.mark.slow
def test_train_step_moves_only_the_branches_it_uses():
    trainer = make_trainer()
    net = trainer.network
    moving = lambda branch: [v.numpy().copy() for v in net.non_trainable_variables  # noqa
                             if f"/{branch}/moving" in v.path]
    before_c, before_a = moving("clean"), moving("adv")
    x, y = batch(32)
    logs = trainer.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"]) and logs["invariance"] > 0
    assert all(not np.allclose(a, b) for a, b in zip(before_c, moving("clean")))
    assert all(not np.allclose(a, b) for a, b in zip(before_a, moving("adv")))
    assert set(logs) >= {"loss", "ce_adv", "ce_clean", "invariance", "a_prev", "train_acc",
                         "train_acc_clean"}


@pytest.mark.slow
@pytest.mark.parametrize("model,kwargs", [("resnet18", {}), ("wrn", {"depth": 10, "width": 1})])
def test_dry_run_step_big_models(model, kwargs):
    net = helpers.new_network(model=model, **kwargs)
    trainer = ARATModel(net, attack_steps=2)
    trainer.compile(optimizer=TorchSGD(0.1))
    assert len(trainer.predictors) == len(net.default_taps)
    x, y = batch(2)
    w0 = [v.numpy().copy() for v in net.trainable_variables[:3]]
    logs = trainer.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"]) and logs["invariance"] > 0
    assert all(not np.allclose(a, v.numpy()) for a, v in zip(w0, net.trainable_variables[:3]))


def test_pgd_at_single_bn_step():
    net = helpers.new_network(split_bn=False)
    trainer = PGDATModel(net, eps=0.3, step_size=0.075, attack_steps=3)
    trainer.compile(optimizer=TorchSGD(0.05))
    x, y = batch(32)
    logs = trainer.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"]) and logs["loss"] > 0
    assert not any("/clean/" in v.path for v in net.variables)


def test_unknown_tap_is_rejected():
    with pytest.raises(ValueError, match="unknown tapped layers"):
        ARATModel(helpers.new_network(), taps=["nope"])


@pytest.mark.slow
def test_ablation_switches_change_what_they_name():
    x, y = batch(16)
    # --predictor=false: no predictor heads; the adversarial feature is compared directly.
    no_pred = make_trainer(predictor=False)
    assert no_pred.predictors == [] and no_pred.use_predictor is False
    # A perturbed adversarial input: identical branches on identical inputs would give
    # cos = 1 and an expected loss of 0, where only float rounding is left to compare.
    x_adv = tf.clip_by_value(x + 0.3 * tf.sign(tf.random.stateless_normal(x.shape, [5, 6])),
                             0.0, 1.0)
    _, fc = no_pred.network(x, training=True, branch="clean", return_features=True)
    _, fa = no_pred.network(x_adv, training=True, branch="adv", return_features=True)
    expected = 0.0
    for tap in no_pred.taps:
        a, c = pooled_feature(fa[tap]).numpy(), pooled_feature(fc[tap]).numpy()
        cos = (a * c).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(c, axis=1),
                                          1e-12)
        expected += 1.0 - cos.mean()
    expected *= no_pred.invariance_weight / len(no_pred.taps)
    assert expected > 1e-2  # the features differ, so the comparison means something
    # float32 against float64 cosines: rtol 1e-4.
    np.testing.assert_allclose(float(no_pred.invariance_loss(fc, fa)), expected, rtol=1e-4)
    # --invariance=none: no invariance term, no predictors, loss = weighted CE only.
    none = make_trainer(invariance="none")
    none.a_prev.assign(0.25)
    _, logs = none.losses_for(x, y)
    assert none.predictors == [] and float(logs["invariance"]) == 0.0
    loss, logs = none.losses_for(x, y)
    np.testing.assert_allclose(float(loss), 0.25 * float(logs["ce_adv"]) +
                               0.75 * float(logs["ce_clean"]), rtol=1e-5)
    # --split_bn=false: one BN per site, so the clean and adv forwards share statistics.
    single = make_trainer(split_bn=False)
    assert not any("/clean/" in v.path or "/adv/" in v.path for v in single.network.variables)
    # --align_layers and --invariance_weight pick the taps and the scale.
    one_tap = make_trainer(taps=["conv4"], invariance_weight=3.0)
    assert one_tap.taps == ("conv4",) and len(one_tap.predictors) == 1
    assert one_tap.invariance_weight == 3.0
    assert make_trainer().invariance_weight == 30.0  # the small CNN's default gamma


@pytest.mark.parametrize("split_bn", [True, False])
def test_joint_pass_equals_two_separate_passes(split_bn):
    """branch="both" on [x; x_adv]: same loss, gradients and BN statistics as two calls."""
    x, y = batch(16)
    x_adv = tf.clip_by_value(x + 0.2 * tf.sign(tf.random.stateless_normal(x.shape, [3, 4])),
                             0.0, 1.0)
    results = []
    for joint in (False, True):
        trainer = make_trainer(split_bn=split_bn, joint_pass=joint)
        trainer.a_prev.assign(0.4)
        trainer.adversarial = lambda x_, y_, branch="adv": x_adv
        with tf.GradientTape() as tape:
            loss, logs = trainer.losses_for(x, y)
        variables = trainer.trainable_variables
        grads = tape.gradient(loss, variables)
        assert all(g is not None for g in grads)
        # Drop the network's auto-numbered name ("small_cnn_12/..."); keep the predictors'.
        key = lambda v: v.path if v.path.startswith("predictor") else v.path.split("/", 1)[1]  # noqa: E731
        moving = {key(v): v.numpy() for v in trainer.non_trainable_variables
                  if "moving" in v.path}
        results.append((float(loss), {k: float(v) for k, v in logs.items()},
                        {key(v): g.numpy() for v, g in zip(variables, grads)}, moving))
    (loss2, logs2, grads2, moving2), (loss1, logs1, grads1, moving1) = results
    # float32 sums over a batch of 32 instead of 16: tolerance rtol 1e-5 on figures,
    # atol 1e-5 + rtol 1e-4 on gradients and moving statistics.
    np.testing.assert_allclose(loss1, loss2, rtol=1e-5)
    for name in logs2:
        np.testing.assert_allclose(logs1[name], logs2[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert grads1.keys() == grads2.keys() and moving1.keys() == moving2.keys()
    assert len(moving1) == (16 if split_bn else 8) + 6  # 4 sites (x2 branches) + 3 predictor BNs
    for path in grads2:
        np.testing.assert_allclose(grads1[path], grads2[path], rtol=1e-4, atol=1e-5,
                                   err_msg=path)
    for path in moving2:
        np.testing.assert_allclose(moving1[path], moving2[path], rtol=1e-4, atol=1e-6,
                                   err_msg=path)


def test_both_branch_normalises_each_half_with_its_own_statistics():
    from keras_arat.layers import SplitBatchNormalization
    layer = SplitBatchNormalization()
    rng = np.random.default_rng(0)
    clean = rng.normal(2.0, 3.0, (8, 4, 4, 3)).astype(np.float32)
    adv = rng.normal(-1.0, 0.5, (8, 4, 4, 3)).astype(np.float32)
    layer.build(clean.shape)
    layer.bns["adv"].gamma.assign([2.0, 2.0, 2.0])
    out = layer(np.concatenate([clean, adv]), training=True, branch="both").numpy()
    for half, data, gamma in ((out[:8], clean, 1.0), (out[8:], adv, 2.0)):
        z = (data - data.mean((0, 1, 2))) / np.sqrt(data.var((0, 1, 2)) + 1e-5)
        np.testing.assert_allclose(half, gamma * z, atol=1e-4)
    np.testing.assert_allclose(layer.bns["clean"].moving_mean.numpy(),
                               0.1 * clean.mean((0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(layer.bns["adv"].moving_mean.numpy(),
                               0.1 * adv.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
