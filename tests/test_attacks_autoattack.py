"""APGD, FAB-T, Square and AutoAttack: threat model, strength, worst case, masking, seeds."""

import numpy as np
import pytest
import tensorflow as tf

from keras_arat.attacks import (APGD, PGD, AutoAttack, FABTargeted, InputRangeError,
                                ProbabilityOutputError, Restarts, Square, core, run_attack)
from keras_arat.evaluation import evaluate_model_fn
from tests import helpers

ATOL = 1e-6
N = 32


@pytest.fixture(scope="module")
def setup():
    net = helpers.tiny_network(split_bn=False, trained=True)
    x, y = helpers.tiny_data().test
    return (lambda z: net(z, training=False, branch="adv")), x[:N], y[:N]


def small_autoattack(eps, norm="linf", n_iter=10, n_queries=300, n_targets=3):
    return AutoAttack(eps=eps, norm=norm, n_iter=n_iter, n_queries=n_queries,
                      n_target_classes=n_targets)


def attacks_for(eps, norm, n_iter=3, n_queries=30):
    return [
        Restarts(PGD(eps=eps, step_size=eps / 4, steps=n_iter, norm=norm), 2),
        APGD(eps=eps, norm=norm, loss="ce", n_iter=n_iter),
        APGD(eps=eps, norm=norm, loss="dlr-targeted", n_iter=n_iter, n_target_classes=2),
        FABTargeted(eps=eps, norm=norm, n_iter=n_iter, n_target_classes=2),
        Square(eps=eps, norm=norm, n_queries=n_queries),
    ]


def norms(x_adv, x, norm):
    d = (x_adv - x).reshape(len(x), -1)
    return np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_every_attack_stays_in_ball_and_box(setup, norm, eps):
    f, x, y = setup
    x, y = x[:8], y[:8]
    for attack in attacks_for(eps, norm):
        x_adv, _ = run_attack(attack, f, x, y, batch_size=8, seed=1, eager=True)
        assert norms(x_adv, x, norm).max() <= eps + ATOL, attack
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0, attack
        if not isinstance(attack, FABTargeted):  # FAB returns x where it found nothing
            assert norms(x_adv, x, norm).max() > 0.5 * eps, attack
    result = small_autoattack(eps, norm, n_iter=3, n_queries=30, n_targets=2).run(
        f, x, y, batch_size=8, seed=1)
    assert norms(result.x_adv, x, norm).max() <= eps + ATOL
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0


@pytest.mark.slow
def test_large_eps_breaks_undefended_cnn_and_autoattack_stages_are_monotone(setup):
    f, x, y = setup
    eps = 0.3
    clean = np.argmax(f(x).numpy(), 1) == y
    assert clean.mean() >= 0.7
    for attack in [APGD(eps=eps, n_iter=10), APGD(eps=eps, loss="dlr-targeted", n_iter=10,
                                                  n_target_classes=2),
                   FABTargeted(eps=eps, n_iter=10, n_target_classes=2),
                   Square(eps=eps, n_queries=500)]:
        _, still = run_attack(attack, f, x, y, batch_size=N, seed=0)
        assert still.mean() <= 0.1, (attack, still.mean())
    accs, details = evaluate_model_fn(f, x, y, 0.1, ("clean", "pgd20", "autoattack"),
                                      batch_size=N, autoattack=small_autoattack(
                                          0.1, n_iter=5, n_queries=200, n_targets=2))
    masks = details["masks"]
    assert np.all(masks["clean"] >= masks["pgd20"])
    assert np.all(masks["clean"] >= masks["autoattack"])
    # The worst case: robust only where both attacks failed.
    np.testing.assert_array_equal(masks["worst_case"], masks["pgd20"] & masks["autoattack"])
    assert accs["worst_case"] <= min(accs["pgd20"], accs["autoattack"])
    stages = details["autoattack"]["stages"]
    assert [s["attack"] for s in stages] == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    accs_along = [s["robust_acc"] for s in stages]
    assert accs_along == sorted(accs_along, reverse=True)
    assert accs_along[-1] == accs["autoattack"]


@pytest.mark.slow
def test_apgd_at_least_as_strong_as_pgd_on_arat_model():
    from keras_arat.training import ARATModel, TorchSGD
    net = helpers.new_network(split_bn=True, seed=1)
    trainer = ARATModel(net, eps=0.2, step_size=0.05, attack_steps=2)
    trainer.compile(optimizer=TorchSGD(0.05, l2_weight_decay=0.0))
    xt, yt = helpers.tiny_data().train
    trainer.fit(xt[:512], yt[:512], batch_size=64, epochs=2, verbose=0, shuffle=False)
    x, y = helpers.tiny_data().test
    x, y = x[:64], y[:64]
    f = lambda z: net(z, training=False, branch="adv")  # noqa: E731
    eps, steps = 0.2, 20
    _, pgd_ok = run_attack(PGD(eps=eps, step_size=eps / 4, steps=steps), f, x, y, 64, seed=0,
                           eager=True)
    _, apgd_ok = run_attack(APGD(eps=eps, n_iter=steps), f, x, y, 64, seed=0, eager=True)
    clean = np.mean(np.argmax(f(x).numpy(), 1) == y)
    assert clean > 0.3  # it learned something, so the comparison means something
    assert apgd_ok.mean() <= pgd_ok.mean() + 1.0 / len(x), (apgd_ok.mean(), pgd_ok.mean())


@tf.custom_gradient
def _quantise(z):
    def grad(upstream):
        return tf.zeros_like(upstream)
    return tf.round(z * 4.0) / 4.0, grad


@pytest.mark.slow
def test_gradient_masking_defeats_gradient_attacks_not_square(setup):
    f, x, y = setup
    masked = lambda z: f(_quantise(z))  # noqa: E731 - zero input gradient everywhere
    eps = 0.3
    aa = AutoAttack(eps=eps, n_iter=5, n_queries=500, n_target_classes=2)
    result = aa.run(masked, x, y, batch_size=N, seed=0)
    after = {s["attack"]: s["robust_acc"] for s in result.stages}
    # The gradient stages barely move (only random starts); Square breaks many more points.
    square_broke = next(s["n_broken"] for s in result.stages if s["attack"] == "square")
    assert square_broke >= 0.25 * N, result.stages
    assert after["fab-t"] - after["square"] >= 0.25, result.stages
    assert any("gradient masking" in w for w in result.warnings)
    assert any("zero input gradient" in w for w in result.warnings)
    # Plain PGD-20 at the same eps fails the same way.
    _, pgd_ok = run_attack(PGD(eps=eps, step_size=eps / 4, steps=20), masked, x, y, N)
    assert pgd_ok.mean() - result.robust_accuracy >= 0.25


@pytest.mark.slow
def test_same_seed_same_adversarial_examples(setup):
    f, x, y = setup
    x, y = x[:16], y[:16]
    aa = small_autoattack(0.1, n_iter=2, n_queries=10, n_targets=2)
    a = aa.run(f, x, y, batch_size=8, seed=3).x_adv
    b = aa.run(f, x, y, batch_size=8, seed=3).x_adv
    np.testing.assert_array_equal(a, b)
    for attack in [APGD(eps=0.05, n_iter=3), Square(eps=0.05, n_queries=20)]:
        a = attack(f, x, y, tf.constant([4, 2], tf.int64)).numpy()
        b = attack(f, x, y, tf.constant([4, 2], tf.int64)).numpy()
        c = attack(f, x, y, tf.constant([4, 3], tf.int64)).numpy()
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_refuses_probabilities_and_out_of_range_inputs(setup):
    f, x, y = setup
    probs = lambda z: tf.nn.softmax(f(z))  # noqa: E731
    with pytest.raises(ProbabilityOutputError, match="probabilities"):
        small_autoattack(0.1).run(probs, x, y)
    with pytest.raises(ValueError, match="probabilities"):
        evaluate_model_fn(probs, x, y, 0.1, ("clean",))
    with pytest.raises(InputRangeError, match=r"\[0,1\]"):
        evaluate_model_fn(f, x * 255.0, y, 0.1, ("clean",))


def test_losses_and_hyperplane_projection_by_hand():
    from keras_arat.attacks.fab import project_on_hyperplane
    logits = tf.constant([[3.0, 1.0, 0.0, -1.0, -2.0]])
    y, t = tf.constant([0]), tf.constant([2])
    np.testing.assert_allclose(core.dlr(logits, y), [-(3.0 - 1.0) / (3.0 - 0.0)], rtol=1e-6)
    np.testing.assert_allclose(core.targeted_dlr(logits, y, t),
                               [-(3.0 - 0.0) / (3.0 - 0.5 * (0.0 - 1.0))], rtol=1e-6)
    np.testing.assert_allclose(core.dlr(2.0 * logits + 5.0, y), core.dlr(logits, y), rtol=1e-5)
    rng = np.random.default_rng(0)
    p = rng.uniform(0.2, 0.8, size=(6, 30)).astype(np.float32)
    w = rng.normal(size=(6, 30)).astype(np.float32)
    b = (np.sum(w * p, 1) + rng.normal(size=6)).astype(np.float32)
    for norm in ("linf", "l2"):
        d = project_on_hyperplane(tf.constant(p), tf.constant(w), tf.constant(b), norm).numpy()
        np.testing.assert_allclose(np.sum(w * (p + d), 1), b, atol=1e-4)
        assert (p + d).min() >= -1e-6 and (p + d).max() <= 1 + 1e-6
        # Unconstrained optimum when the box does not bind: |c| / ||w||_dual.
        free = np.abs(np.sum(w * p, 1) - b) / (np.abs(w).sum(1) if norm == "linf"
                                               else np.linalg.norm(w, axis=1))
        got = norms(p + d, p, norm)
        assert np.all(got >= free - 1e-5)
        np.testing.assert_allclose(got[got <= 0.2], free[got <= 0.2], rtol=1e-4)
