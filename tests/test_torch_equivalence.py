"""keras_arat computes what the official PyTorch code computes, on the same weights.

tests/fixtures/torch_reference.npz holds what the official AR-AT code (and the TRADES and
MART authors' loss functions) output for weights drawn by tests/fixtures/seeded_weights.py;
tests/fixtures/make_torch_reference.py made it, by hand, with torch. Here the same weights
are drawn again, go through keras_arat.convert_torch into keras_arat's models, and every
quantity is compared. No torch is needed.

Tolerances (float32 on both sides unless said; measured figures print with pytest -s):
  logits, features, BN statistics: 1e-4 of the largest reference value (measured ~5e-6)
  losses: 1e-5 relative (1e-12 in float64); gradients: 1e-10 of each tensor's norm in
  float64, and in float32 no further from the exact ones than PyTorch's own float32 ones
  (BN's backward pass puts ~5e-3 of rounding error in the early layers' float32
  gradients, in both frameworks); SGD steps: 1e-6 of the weights' largest.
  PGD: in float64, every official attack (PGD-10, PGD-20, TRADES', MART's) is reproduced
  to 1e-12, every pixel; in float32 a step's sign is left to rounding where the input
  gradient is near zero or a pre-activation sits on a ReLU's kink, so each official step
  is compared with the exact (float64) one (the first 5 steps of each attack), and
  keras_arat may take no more wrong steps than twice the official code does (plus 0.05%).
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_arat import convert_torch as ct
from keras_arat.attacks import PGD, core
from keras_arat.training import ARATModel, MARTModel, TorchSGD, TRADESModel
from keras_arat.training.trainers import pooled_feature
from tests.fixtures import seeded_weights as sw

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "torch_reference.npz")
REF = dict(np.load(FIXTURE))
EPS, STEP = float(REF["eps"]), float(REF["step_size"])
R18_TAPS = ("layer4.0.bn1", "layer4.0.bn2", "layer4.1.bn1", "layer4.1.bn2")


def seeded_state(prefix):
    """The fixture's state_dict, drawn again from the seed (checked against its digest)."""
    pairs = [(k, [int(s) for s in shape.split(",") if s])
             for k, shape in zip(REF[f"{prefix}keys"], REF[f"{prefix}shapes"])]
    state = sw.seeded_state(pairs)
    assert sw.digest(state) == str(REF[f"{prefix}digest"]), \
        f"{prefix}: seeded weights differ from the fixture's (numpy's random stream changed?)"
    return state


def rel_max(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def rel_norm(got, want):
    return float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))


class Split:
    """The split-BN ResNet-18 and its ARAT trainer, with the fixture's weights."""

    def __init__(self, **trainer_kwargs):
        self.state = seeded_state("r18s_")
        self.network, info = ct.build_network(self.state, "resnet18")
        assert info == {"split_bn": True, "num_classes": 10}
        self.trainer = ARATModel(self.network, eps=EPS, step_size=STEP, attack_steps=10,
                                 **trainer_kwargs)
        self.entries = ct.weight_map(self.network)
        for i, p in enumerate(self.trainer.predictors):
            prefix = f"r18s_pred{i}_"
            entries = ct.predictor_map(p)
            ct.assign(entries, seeded_state(prefix), "predictor state_dict")
            self.entries += [(f"pred{i}.{k}", v, layout) for k, v, layout in entries]
        self.initial = [(v, v.numpy().copy()) for _, v, _ in self.entries]
        self.by_key = {k: (v, layout) for k, v, layout in self.entries}

    def reset(self):
        """Back to the fixture's weights (training-mode passes move BN statistics)."""
        for v, value in self.initial:
            v.assign(value)
        self.trainer.a_prev.assign(float(REF["a_prev"]))

    def torch_value(self, key, value):
        return ct.to_torch(np.asarray(value), self.by_key[key][1])


@pytest.fixture(scope="module")
def split():
    return Split()


def float64_split(**trainer_kwargs):
    """Split in float64 (weights, activations, losses), against the official code's
    float64 runs."""
    keras.config.set_dtype_policy("float64")
    try:
        s = Split(**trainer_kwargs)
    finally:
        keras.config.set_dtype_policy("float32")
    assert s.network.graph.get_layer("linear").kernel.dtype == "float64"
    return s


@pytest.fixture(scope="module")
def split64():
    return float64_split()


def test_seeded_weights_cover_every_keras_weight(split):
    assert {id(v) for _, v, _ in split.entries} == \
        {id(v) for v in split.network.weights + [w for p in split.trainer.predictors
                                                 for w in p.weights]}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("branch", ["clean", "adv"])
def test_logits_and_tapped_features(split, mode, branch):
    split.reset()
    logits, feats = split.network(REF["r18_x"], training=mode == "train", branch=branch,
                                  return_features=True)
    worst = rel_max(logits, REF[f"r18s_logits_{mode}_{branch}"])
    for tap in R18_TAPS:
        worst = max(worst, rel_max(pooled_feature(feats[tap]),
                                   REF[f"r18s_feat_{mode}_{branch}/{tap}"]))
    print(f"{mode} {branch}: logits and features differ by {worst:.1e} of their largest")
    assert worst < 1e-4


def test_moving_statistics_follow_pytorch(split):
    """One training-mode pass moves each branch's statistics as PyTorch's BatchNorm2d
    (momentum 0.1, unbiased variance): this found the biased moving variance."""
    split.reset()
    worst = 0.0
    for branch in ("clean", "adv"):
        split.network(REF["r18_x"], training=True, branch=branch)
        found = [k for k in REF if k.startswith(f"r18s_running_after_{branch}/")]
        assert len(found) == 2 * 20  # mean and variance of the 20 BN sites
        for k in found:
            worst = max(worst, rel_max(split.by_key[k.split("/", 1)[1]][0].numpy(), REF[k]))
    print(f"moving statistics after one pass differ by {worst:.1e}")
    assert worst < 1e-5


def arat_loss(split, x, x_adv):
    split.trainer.adversarial = lambda *args, **kwargs: tf.constant(x_adv)
    try:
        return split.trainer.losses_for(tf.constant(x), tf.constant(REF["r18_y"]))
    finally:
        del split.trainer.adversarial


def test_arat_loss_and_terms(split):
    split.reset()
    loss, logs = arat_loss(split, REF["r18_x"], REF["r18_x_adv"])
    pairs = {"loss": (loss, REF["r18s_loss"]), "ce_adv": (logs["ce_adv"], REF["r18s_ce_adv"]),
             "ce_clean": (logs["ce_clean"], REF["r18s_ce_clean"]),
             "invariance": (logs["invariance"], REF["r18s_invariance"])}
    for name, (got, want) in pairs.items():
        print(f"{name}: {float(got):.6f} vs official {float(want):.6f}")
        assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want)), name
    # Each layer's term: the same loss with one tapped layer (gamma / L of it).
    for i, tap in enumerate(R18_TAPS):
        feats = {}
        for branch, x in (("clean", REF["r18_x"]), ("adv", REF["r18_x_adv"])):
            feats[branch] = split.network(x, training=True, branch=branch,
                                          return_features=True)[1]
        z_adv = split.trainer.predictors[i](pooled_feature(feats["adv"][tap]), training=True)
        cos = tf.reduce_mean(tf.reduce_sum(
            tf.math.l2_normalize(z_adv, -1) * tf.math.l2_normalize(
                pooled_feature(feats["clean"][tap]), -1), -1))
        term = 30.0 / 4 * (1.0 - float(cos))
        want = float(REF["r18s_invariance_per_layer"][i])
        assert abs(term - want) <= 1e-5 * abs(want), (tap, term, want)


def arat_gradients(split):
    """{torch key: gradient of the ARAT loss on the fixed batch, PyTorch layout}."""
    split.reset()
    variables = split.trainer.trainable_variables
    with tf.GradientTape() as tape:
        loss, _ = arat_loss(split, REF["r18_x"], REF["r18_x_adv"])
    grads = dict(zip([id(v) for v in variables], tape.gradient(loss, variables)))
    keys = [k.split("/", 1)[1] for k in REF if k.startswith("r18s_grad64/")]
    assert {"conv1.weight", "linear.weight", "linear.bias", "bn1.clean.weight",
            "bn1.adv.bias", "layer4.1.bn2.adv.weight", "pred0.predictor_x.1.weight",
            "pred3.predictor_x.3.bias"} <= set(keys)
    return {k: split.torch_value(k, grads[id(split.by_key[k][0])].numpy()) for k in keys}


def test_arat_gradients_in_float64(split64):
    """Gradients of the ARAT loss for the stem conv, every BN of both branches, fc and
    the predictors, in float64 on both sides: the same to 1e-10 of each tensor's norm."""
    grads = arat_gradients(split64)
    worst = max(rel_norm(g, REF[f"r18s_grad64/{k}"]) for k, g in grads.items())
    print(f"{len(grads)} float64 gradients: largest difference {worst:.1e} of the norm")
    assert worst < 1e-10


def test_arat_gradients_in_float32_are_as_exact_as_pytorchs(split):
    """In float32 the early BNs' gradients carry ~5e-3 of rounding error, in the official
    code as here (BN's backward pass cancels: its gradients sum to ~0 over the batch).
    keras_arat's float32 gradient is, tensor by tensor, no further from the exact (float64)
    one than twice PyTorch's own float32 gradient is, or than three times the largest
    error PyTorch's float32 gradient has on any tensor (4.7e-3: the float32 noise of the
    reference itself), and within 1e-4 of PyTorch's on the predictors and fc. The second
    bound is for CPUs whose kernels round differently: TensorFlow's oneDNN kernels on an
    AMD EPYC with AVX-512 leave 6e-3 on deep BN tensors where PyTorch's have 1e-5 (1.1e-2
    at most), and without oneDNN 2.2x PyTorch's on the first BN. A wrong formula is off
    by far more; the float64 tests above pin the formulas to 1e-10."""
    grads = arat_gradients(split)
    noise = max(rel_norm(REF[f"r18s_grad/{key}"], REF[f"r18s_grad64/{key}"]) for key in grads)
    worst_ratio, worst_top, worst_gap = 0.0, 0.0, 0.0
    for key, got in grads.items():
        exact = REF[f"r18s_grad64/{key}"]
        ours, theirs = rel_norm(got, exact), rel_norm(REF[f"r18s_grad/{key}"], exact)
        assert ours <= max(2.0 * theirs, 3.0 * noise), (key, ours, theirs, noise)
        worst_ratio = max(worst_ratio, ours / max(theirs, 1e-5))
        worst_gap = max(worst_gap, rel_norm(got, REF[f"r18s_grad/{key}"]))
        if key.startswith("pred") or key.startswith("linear"):
            worst_top = max(worst_top, rel_norm(got, REF[f"r18s_grad/{key}"]))
    print(f"float32 gradients: largest difference from PyTorch's {worst_gap:.1e} of the norm; "
          f"from the exact ones at most {worst_ratio:.2f} x PyTorch's own; predictors and "
          f"fc within {worst_top:.1e} of PyTorch's")
    assert worst_top < 1e-4


def test_two_sgd_steps_with_momentum_and_weight_decay(split):
    """TorchSGD(0.1, momentum 0.9, weight decay 5e-4) given the official gradients of two
    steps reproduces the official weights after each (torch.optim.SGD, as train_ARAT.py
    builds it): the second step uses the momentum buffer."""
    split.reset()
    keys = [k.split("/", 1)[1] for k in REF if k.startswith("r18s_grad_step2/")]
    variables = [split.by_key[k][0] for k in keys]
    optimizer = TorchSGD(0.1, momentum=0.9, l2_weight_decay=5e-4)
    optimizer.build(variables)
    worst = 0.0
    for step, grads in ((1, "r18s_grad"), (2, "r18s_grad_step2")):
        optimizer.apply([ct.to_keras(REF[f"{grads}/{k}"], split.by_key[k][1]) for k in keys],
                        variables)
        for key in keys:
            got = split.torch_value(key, split.by_key[key][0].numpy())
            worst = max(worst, rel_max(got, REF[f"r18s_step{step}/{key}"]))
    print(f"{len(keys)} tensors after two SGD steps differ by {worst:.1e} of their largest")
    assert worst < 1e-6


# ------------------------------------------------------------------------------ PGD

def replay(center, signs, start=None):
    """The official iterates from its step signs, in the dtype of `center` (the fixture
    script checked that this gives the official result exactly):
    z <- clip(min(max(z + step * sign, center - eps), center + eps), 0, 1)."""
    f = center.dtype.type
    z = center if start is None else start
    iterates = [z]
    for s in signs:
        z = np.clip(np.minimum(np.maximum(z + f(STEP) * s, center - f(EPS)), center + f(EPS)),
                    0, 1)
        iterates.append(z)
    return iterates


def input_gradient(model_fn, loss, target, z):
    z = tf.constant(z)
    with tf.GradientTape() as tape:
        tape.watch(z)
        total = tf.reduce_sum(loss(model_fn(z), target))
    return tape.gradient(total, z).numpy()


# The float32 sign check costs a float32 and a float64 gradient per step: the first steps
# of each attack.
FLOAT32_STEPS = 5


def check_float32_signs(fn32, fn64, loss, target32, target64, iterates, signs, label):
    """At the first official float32 iterates: how many of the official step signs, and of
    keras_arat's float32 ones, differ from the exact (float64) gradient's sign. In float32
    some signs are decided by rounding (near-zero gradients, pre-activations within
    rounding of a ReLU's kink); keras_arat may get no more of them wrong than twice the
    official code does, plus 0.05% of the pixel steps."""
    ours_wrong = official_wrong = 0
    signs = signs[:FLOAT32_STEPS]
    for k, z in enumerate(iterates[:FLOAT32_STEPS]):
        exact = np.sign(input_gradient(fn64, loss, target64, z.astype(np.float64)))
        ours = np.sign(input_gradient(fn32, loss, target32, z))
        ours_wrong += int((ours != exact).sum())
        official_wrong += int((signs[k] != exact).sum())
    total = len(signs) * signs[0].size
    print(f"{label}, float32: step signs other than the exact ones: official "
          f"{official_wrong}, keras_arat {ours_wrong} of {total}")
    assert ours_wrong <= 2 * official_wrong + 5e-4 * total


def check_float64_run(attack, fn64, target64, x64, center64, signs64, label, start=None):
    """keras_arat's PGD in float64 from the official float64 start reproduces the official
    float64 attack, every pixel of every image."""
    official = replay(center64, signs64, start)[-1]
    ours = attack(fn64, tf.constant(x64), target64, tf.constant([0, 0], tf.int64),
                  start=tf.constant(center64 if start is None else start)).numpy()
    err = float(np.abs(ours - official).max())
    print(f"{label}, float64: {len(signs64)} steps, largest difference {err:.1e}")
    assert err <= 1e-12


@pytest.mark.slow  # 25-40 s: whole attacks in float64 against the reference's
def test_pgd10_training_attack(split, split64):
    """The official training attack (adv branch, BN in training mode), its in-place noisy
    start included: keras_arat's PGD with noise_leak, started where the official one
    started, takes the same steps (centred on that start)."""
    split.reset(), split64.reset()
    y = tf.constant(REF["r18_y"])
    fns = [lambda z, s=s: s.network(z, training=True, branch="adv") for s in (split, split64)]
    attack = PGD(eps=EPS, step_size=STEP, steps=10, noise_leak=True)
    check_float64_run(attack, fns[1], y, REF["r18_x"].astype(np.float64),
                      REF["r18s_pgd10_f64_noisy_x"], REF["r18s_pgd10_f64_signs"], "PGD-10")
    c = REF["r18s_pgd10_noisy_x"]
    iterates = replay(c, REF["r18s_pgd10_signs"])
    np.testing.assert_array_equal(iterates[-1], REF["r18s_pgd10_x_adv"])
    check_float32_signs(*fns, core.cross_entropy, y, y, iterates, REF["r18s_pgd10_signs"],
                        "PGD-10")


@pytest.mark.slow  # 25-40 s: whole attacks in float64 against the reference's
def test_pgd20_evaluation_attack(split, split64):
    """The official PGD-20 evaluation (adv branch, inference mode; the same in-place
    start), and the official logits on its result."""
    split.reset(), split64.reset()
    y = tf.constant(REF["r18_y"])
    fns = [lambda z, s=s: s.network(z, training=False, branch="adv") for s in (split, split64)]
    attack = PGD(eps=EPS, step_size=STEP, steps=20, noise_leak=True)
    check_float64_run(attack, fns[1], y, REF["r18_x"].astype(np.float64),
                      REF["r18s_pgd20_f64_noisy_x"], REF["r18s_pgd20_f64_signs"], "PGD-20")
    c = REF["r18s_pgd20_noisy_x"]
    iterates = replay(c, REF["r18s_pgd20_signs"])
    np.testing.assert_array_equal(iterates[-1], REF["r18s_pgd20_x_adv"])
    check_float32_signs(*fns, core.cross_entropy, y, y, iterates, REF["r18s_pgd20_signs"],
                        "PGD-20")
    assert rel_max(fns[0](iterates[-1]), REF["r18s_pgd20_logits"]) < 1e-4


def test_reference_noise_leak_reproduces_the_official_training_step(split):
    """--reference_noise_leak: keras_arat's training step feeds the attack's noisy start
    to the clean branch, as the official code does, and gets the official losses for the
    official noisy batch and attack result; the default keeps x clean."""
    split.reset()
    x, noisy, x_adv = REF["r18_x"], REF["r18s_pgd10_noisy_x"], REF["r18s_pgd10_x_adv"]
    leaky = ARATModel(split.network, eps=EPS, step_size=STEP, attack_steps=10,
                      reference_noise_leak=True)
    assert leaky.attack.noise_leak and not split.trainer.attack.noise_leak
    for i, p in enumerate(leaky.predictors):
        ct.assign(ct.predictor_map(p), seeded_state(f"r18s_pred{i}_"))
    leaky.a_prev.assign(float(REF["a_prev"]))
    calls = []

    def official_attack(x_, y_, branch="adv", **kwargs):
        calls.append(kwargs)
        return tf.constant(x_adv), tf.constant(noisy)
    leaky.adversarial = official_attack
    loss, logs = leaky.losses_for(tf.constant(x), tf.constant(REF["r18_y"]))
    assert calls == [{"return_center": True}]
    for name, got in (("loss", loss), ("ce_adv", logs["ce_adv"]),
                      ("ce_clean", logs["ce_clean"]), ("invariance", logs["invariance"])):
        want = float(REF[f"r18s_leak_{name}"])
        print(f"leaky step {name}: {float(got):.6f} vs official {want:.6f}")
        assert abs(float(got) - want) <= 1e-5 * abs(want), name
    split.reset()
    _, logs = arat_loss(split, x, x_adv)
    assert abs(float(logs["ce_clean"]) - float(REF["r18s_leak_ce_clean"])) > 1e-3


# ------------------------------------------------------------------ TRADES and MART

@pytest.fixture(scope="module")
def plain():
    """The single-BN ResNet-18, in float32 and float64, and a function restoring both."""
    state = seeded_state("r18p_")
    networks = []
    for dtype in ("float32", "float64"):
        keras.config.set_dtype_policy(dtype)
        try:
            network, info = ct.build_network(state, "resnet18")
        finally:
            keras.config.set_dtype_policy("float32")
        assert info == {"split_bn": False, "num_classes": 10}
        networks.append(network)
    initial = [(v, v.numpy().copy()) for n in networks for v in n.weights]

    def reset():
        for v, value in initial:
            v.assign(value)
    return networks, reset


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_single_bn_resnet18_logits(plain, mode):
    (network, _), reset = plain
    reset()
    err = rel_max(network(REF["r18_x"], training=mode == "train"), REF[f"r18p_logits_{mode}"])
    print(f"single-BN ResNet-18, {mode}: logits differ by {err:.1e}")
    assert err < 1e-4


@pytest.mark.slow  # 25 s each
@pytest.mark.parametrize("method", ["trades", "mart"])
def test_trades_and_mart_against_their_authors_code(plain, method):
    """Their authors' functions: the loss on their adversarial batch (float32 and float64),
    and their attack (BN in inference mode, from the Gaussian start they drew)."""
    networks, reset = plain
    cls, beta = {"trades": (TRADESModel, 6.0), "mart": (MARTModel, 5.0)}[method]
    x, y = REF["r18_x"], tf.constant(REF["r18_y"])
    normal = REF["r18p_start_normal"]
    fns, targets = [], []
    for network, dtype in zip(networks, (np.float32, np.float64)):
        reset()
        fn = lambda z, n=network: n(z, training=False)  # noqa: E731
        fns.append(fn)
        targets.append(tf.nn.softmax(fn(x.astype(dtype))) if method == "trades" else y)
    trainer = cls(networks[0], beta=beta, eps=EPS, step_size=STEP, attack_steps=10)
    x64 = x.astype(np.float64)
    check_float64_run(trainer.attack, fns[1], targets[1], x64, x64,
                      REF[f"r18p_{method}_f64_signs"], method,
                      start=x64 + 0.001 * normal.astype(np.float64))
    iterates = replay(x, REF[f"r18p_{method}_signs"], start=x + np.float32(0.001) * normal)
    np.testing.assert_array_equal(iterates[-1], REF[f"r18p_{method}_x_adv"])
    check_float32_signs(*fns, trainer.attack.loss, targets[0], targets[1], iterates,
                        REF[f"r18p_{method}_signs"], method)
    for network, tag, x_adv in ((networks[0], "", REF[f"r18p_{method}_x_adv"]),
                                (networks[1], "_f64", replay(
                                    x64, REF[f"r18p_{method}_f64_signs"],
                                    x64 + 0.001 * normal.astype(np.float64))[-1])):
        reset()
        trainer = cls(network, beta=beta, eps=EPS, step_size=STEP, attack_steps=10)
        trainer.adversarial = lambda *args, adv=x_adv, **kwargs: tf.constant(adv)
        loss, _ = trainer.losses_for(tf.constant(x.astype(x_adv.dtype)), y)
        want = float(REF[f"r18p_{method}{tag}_loss"])
        print(f"{method} loss{tag}: {float(loss):.8f} vs official {want:.8f}")
        assert abs(float(loss) - want) <= (1e-5 if tag == "" else 1e-12) * abs(want)


# ------------------------------------------------------------------------- WRN-34-10

def test_wrn34_10_logits_features_and_arat_loss():
    """The official WRN-34-10 (split BN, and the plain one) on 16x16 inputs: logits of
    both branches in both modes, the 11 tapped features, and the ARAT loss (gamma 100)."""
    state = seeded_state("wrns_")
    network, info = ct.build_network(state, "wrn", input_shape=(16, 16, 3))
    assert info == {"split_bn": True, "num_classes": 10, "wrn_depth": 34, "wrn_width": 10}
    del state
    x, x_adv = REF["wrn_x"], REF["wrn_x_adv"]
    initial = [(v, v.numpy().copy()) for v in network.non_trainable_weights]
    worst = 0.0
    for mode in ("eval", "train"):
        for branch in ("clean", "adv"):
            logits, feats = network(x, training=mode == "train", branch=branch,
                                    return_features=True)
            worst = max(worst, rel_max(logits, REF[f"wrns_logits_{mode}_{branch}"]))
            if mode == "train":
                official = [k for k in REF if k.startswith(f"wrns_feat_train_{branch}/")]
                assert len(official) == 11
                for k in official:
                    tap = k.split("/", 1)[1]
                    ours = "pool" if tap == "avgpool" else tap.replace(".layer.", ".")
                    worst = max(worst, rel_max(pooled_feature(feats[ours]), REF[k]))
    print(f"WRN-34-10: logits and features differ by {worst:.1e} of their largest")
    assert worst < 1e-4
    for v, value in initial:
        v.assign(value)
    trainer = ARATModel(network, input_shape=(16, 16, 3))
    assert trainer.invariance_weight == 100.0 and len(trainer.taps) == 11
    for i, p in enumerate(trainer.predictors):
        ct.assign(ct.predictor_map(p), seeded_state(f"wrns_pred{i}_"))
    trainer.a_prev.assign(float(REF["a_prev"]))
    trainer.adversarial = lambda *args, **kwargs: tf.constant(x_adv)
    loss, logs = trainer.losses_for(tf.constant(x), tf.constant(REF["wrn_y"]))
    for name, got in (("loss", loss), ("ce_adv", logs["ce_adv"]),
                      ("ce_clean", logs["ce_clean"]), ("invariance", logs["invariance"])):
        want = float(REF[f"wrns_{name}"])
        print(f"WRN-34-10 ARAT {name}: {float(got):.6f} vs official {want:.6f}")
        assert abs(float(got) - want) <= 1e-5 * abs(want), name
    del network, trainer
    plain, info = ct.build_network(seeded_state("wrnp_"), "wrn", input_shape=(16, 16, 3))
    assert not info["split_bn"]
    err = rel_max(plain(x, training=False), REF["wrnp_logits_eval"])
    print(f"plain WRN-34-10 eval logits differ by {err:.1e}")
    assert err < 1e-4
