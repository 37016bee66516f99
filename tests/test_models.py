"""Tests for keras_arat.models: architectures, split BN behaviour, saving."""

import json
import os

import numpy as np
import pytest
import keras
import tensorflow as tf

from keras_arat.layers.split_batch_norm import SplitBatchNormalization
from keras_arat.models import (MODEL_NAMES, PreActResNet18, ResNet18, SmallCNN,
                               TorchConv2D, WideResNet, build_model)

BATCH = 2


def n_params(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def split_bn_sites(model):
    return [l for l in model._flatten_layers(include_self=False)
            if isinstance(l, SplitBatchNormalization)]


def keras_bns(model):
    return [l for l in model._flatten_layers(include_self=False)
            if isinstance(l, keras.layers.BatchNormalization)]  # TorchBatchNormalization


def images(seed=0, n=BATCH, shape=(32, 32, 3)):
    return np.random.default_rng(seed).random((n,) + shape, dtype=np.float32)


def to_np(x):
    """Tensor or Keras variable -> numpy array."""
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x)


def np_close(a, b, atol=1e-6):
    np.testing.assert_allclose(to_np(a), to_np(b), atol=atol, rtol=0)


# ----------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def resnet18():
    return build_model("resnet18")


@pytest.fixture(scope="module")
def wrn10_1():
    return build_model("wrn10_1")


# ------------------------------------------------------ PyTorch-style convs

def _torch_conv_reference(x, kernel, stride, pad):
    """Direct NHWC cross-correlation with symmetric zero padding (PyTorch)."""
    x = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    kh, kw, _, cout = kernel.shape
    n, h, w, _ = x.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.zeros((n, oh, ow, cout), np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            out[:, i, j, :] = np.tensordot(patch, kernel, axes=([1, 2, 3], [0, 1, 2]))
    return out


@pytest.mark.parametrize("kernel_size,stride,pad", [(3, 2, 1), (3, 1, 1), (1, 2, 0)])
def test_torch_conv_matches_pytorch_padding(kernel_size, stride, pad):
    x = images(seed=1, shape=(8, 8, 3))
    conv = TorchConv2D(4, kernel_size, strides=stride, torch_padding=pad,
                       use_bias=False)
    y = to_np(conv(x))
    ref = _torch_conv_reference(x.astype(np.float64),
                                to_np(conv.kernel), stride, pad)
    assert y.shape == ref.shape == (BATCH, (8 + 2 * pad - kernel_size) // stride + 1,
                                    (8 + 2 * pad - kernel_size) // stride + 1, 4)
    np.testing.assert_allclose(y, ref, atol=1e-5)
    assert conv.compute_output_shape((None, 8, 8, 3)) == (None,) + ref.shape[1:]


def test_torch_conv_stride2_differs_from_keras_same():
    # On an even input Keras "same" pads only bottom/right; PyTorch pads both.
    x = np.ones((1, 4, 4, 1), np.float32)
    conv = TorchConv2D(1, 3, strides=2, torch_padding=1, use_bias=False,
                       kernel_initializer="ones")
    y = to_np(conv(x))[0, :, :, 0]
    np.testing.assert_allclose(y, [[4.0, 6.0], [6.0, 9.0]])


# ---------------------------------------------------------------- small CNN

@pytest.mark.parametrize("split_bn", [True, False])
def test_small_cnn_shapes_and_features(split_bn):
    model = build_model("small_cnn", num_classes=7, split_bn=split_bn)
    assert isinstance(model, SmallCNN) and model.built
    x = images()
    for branch in ("clean", "adv"):
        for training in (False, True):
            logits, feats = model(x, training=training, branch=branch,
                                  return_features=True)
            assert tuple(logits.shape) == (BATCH, 7)
            assert tuple(feats) == model.feature_names
    expected = {"conv1": (32, 32, 32), "conv2": (16, 16, 32), "conv3": (16, 16, 64),
                "conv4": (8, 8, 64), "dense": (128,)}
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == expected
    # "dense" is taken after its ReLU; the conv taps are BN outputs before it.
    assert float(keras.ops.min(feats["dense"])) >= 0.0
    assert float(keras.ops.min(feats["conv1"])) < 0.0
    assert tuple(model(x).shape) == (BATCH, 7)


def test_small_cnn_width_and_defaults():
    model = build_model("small_cnn", width=8, dense_units=16, input_shape=(28, 28, 1))
    _, feats = model(images(shape=(28, 28, 1)), return_features=True)
    assert [feats[f"conv{i}"].shape[-1] for i in range(1, 5)] == [8, 8, 16, 16]
    assert feats["conv4"].shape[1:3] == (7, 7)
    assert feats["dense"].shape[-1] == 16
    assert model.default_taps == ("conv3", "conv4", "dense")
    assert model.default_invariance_weight == 30.0
    assert set(model.default_taps) <= set(model.feature_names) <= set(model.tap_names)
    # Convs before BN have no bias; both Dense layers do.
    assert all(not model.graph.get_layer(f"conv{i}").use_bias for i in range(1, 5))
    assert model.graph.get_layer("dense").use_bias
    assert model.graph.get_layer("classifier").use_bias
    # Any layer of the graph can be tapped by its own name, too.
    _, more = model(images(shape=(28, 28, 1)), return_features=("relu2", "flatten"))
    assert more["relu2"].shape[1:] == (14, 14, 8) and more["flatten"].shape[-1] == 7 * 7 * 16



def test_small_cnn_stem_stride_halves_every_later_layer():
    plain = build_model("small_cnn", width=8)
    strided = build_model("small_cnn", width=8, stem_stride=2)
    _, feats = strided(images(), return_features=True)
    assert [feats[f"conv{i}"].shape[1] for i in range(1, 5)] == [16, 8, 8, 4]
    # Same weights but the classifier's input: 4x4 instead of 8x8 before flatten.
    assert plain.count_params() - strided.count_params() == (8 * 8 - 4 * 4) * 16 * 128
    again = SmallCNN.from_config(strided.get_config())
    assert again.stem_stride == 2 and again.count_params() == strided.count_params()
    with pytest.raises(ValueError, match="stem_stride must be a positive integer"):
        build_model("small_cnn", stem_stride=0)


def _moving_stats(model, branch):
    return [to_np(w).copy()
            for site in split_bn_sites(model)
            for w in (site.branch_layer(branch).moving_mean,
                      site.branch_layer(branch).moving_variance)]


@pytest.mark.parametrize("used,unused", [("clean", "adv"), ("adv", "clean")])
def test_training_moves_only_the_used_branch_statistics(used, unused):
    model = build_model("small_cnn")
    before_used, before_unused = _moving_stats(model, used), _moving_stats(model, unused)
    model(images(seed=3), training=True, branch=used)
    after_used, after_unused = _moving_stats(model, used), _moving_stats(model, unused)
    assert all(not np.allclose(a, b) for a, b in zip(before_used, after_used))
    for a, b in zip(before_unused, after_unused):
        np.testing.assert_array_equal(a, b)
    # Inference does not move anything.
    model(images(seed=4), training=False, branch=used)
    for a, b in zip(after_used, _moving_stats(model, used)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(6, 4, 5, 3), (7, 3)])
def test_moving_statistics_as_pytorch_keeps_them(shape):
    """Moving mean 0.9 m + 0.1 mean; moving variance 0.9 v + 0.1 * the unbiased batch
    variance (n / (n - 1) times the biased one that normalises), as torch.nn.BatchNorm
    with momentum 0.1; the output itself uses the biased variance (eps 1e-5)."""
    x = np.random.default_rng(0).normal(1.0, 2.0, shape).astype("float32")
    layer = SplitBatchNormalization()
    out = layer(x, training=True, branch="clean").numpy()
    axes = tuple(range(len(shape) - 1))
    n = int(np.prod([shape[a] for a in axes]))
    mean, var = x.mean(axes, dtype=np.float64), x.var(axes, dtype=np.float64)
    bn = layer.branch_layer("clean")
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 + 0.1 * var * n / (n - 1),
                               rtol=1e-5)
    np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
    # The adv branch did not move.
    np.testing.assert_array_equal(layer.branch_layer("adv").moving_variance.numpy(),
                                  np.ones(shape[-1], np.float32))


def test_single_bn_mode_has_one_bn_per_site_and_ignores_branch():
    split = build_model("small_cnn", split_bn=True)
    single = build_model("small_cnn", split_bn=False)
    assert len(split_bn_sites(single)) == len(split_bn_sites(split)) == 4
    assert all(not s.split and len(s.bns) == 1 for s in split_bn_sites(single))
    assert len(keras_bns(single)) == 4
    assert all(s.split and len(s.bns) == 2 for s in split_bn_sites(split))
    assert len(keras_bns(split)) == 8
    for site in split_bn_sites(single):
        assert site.branch_layer("clean") is site.branch_layer("adv")
    x = images(seed=5)
    site = split_bn_sites(single)[0]
    site.branch_layer("adv").gamma.assign(
        np.linspace(0.5, 2.0, site.branch_layer("adv").gamma.shape[0]))
    np_close(single(x, branch="clean"), single(x, branch="adv"), atol=0)
    # Same in training mode (batch statistics).
    np_close(single(x, training=True, branch="clean"),
             single(x, training=True, branch="adv"), atol=1e-6)
    # Trainable extras of the split model are exactly one gamma + beta per channel.
    extra = n_params(split.trainable_weights) - n_params(single.trainable_weights)
    assert extra == 2 * (32 + 32 + 64 + 64)
    assert n_params(split.non_trainable_weights) == 2 * n_params(single.non_trainable_weights)


def test_small_cnn_branches_differ_once_gammas_differ():
    model = build_model("small_cnn")
    x = images(seed=6)
    clean0 = model(x, branch="clean")
    np_close(clean0, model(x, branch="adv"), atol=0)  # identical initial BNs
    site = split_bn_sites(model)[1]
    site.branch_layer("adv").gamma.assign(2.0 * np.ones(site.branch_layer("adv").gamma.shape))
    adv = model(x, branch="adv")
    assert np.max(np.abs(to_np(adv - clean0))) > 1e-4
    np_close(model(x, branch="clean"), clean0, atol=0)  # clean branch untouched


def test_small_cnn_runs_in_tf_function_with_gradients():
    model = build_model("small_cnn")
    x, y = images(seed=7), np.array([1, 2])

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            clean = model(x, training=True, branch="clean")
            adv = model(x, training=True, branch="adv")
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(y, clean, from_logits=True)
                + keras.losses.sparse_categorical_crossentropy(y, adv, from_logits=True))
        return tape.gradient(loss, model.trainable_weights)

    grads = step(x, y)
    assert all(g is not None for g in grads)
    by_name = {w.path: g for w, g in zip(model.trainable_weights, grads)}
    for site in split_bn_sites(model):
        for branch in ("clean", "adv"):
            g = by_name[site.branch_layer(branch).gamma.path]
            assert float(tf.reduce_sum(tf.abs(g))) > 0.0


# ---------------------------------------------------------------- ResNet-18

def _resnet18_bn_channels():
    """Sum of BN channels of CIFAR ResNet-18, from the architecture itself."""
    total, in_planes = 64, 64  # stem BN
    for planes, stride in zip((64, 128, 256, 512), (1, 2, 2, 2)):
        for i in range(2):
            s = stride if i == 0 else 1
            total += 2 * planes  # bn1, bn2
            if s != 1 or in_planes != planes:
                total += planes  # shortcut BN
            in_planes = planes
    return total


def test_resnet18_parameter_counts(resnet18):
    bn_channels = _resnet18_bn_channels()
    assert bn_channels == 4800
    single = build_model("resnet18", split_bn=False)
    assert n_params(single.trainable_weights) == 11_173_962
    assert n_params(single.non_trainable_weights) == 2 * bn_channels
    assert n_params(resnet18.trainable_weights) == 11_173_962 + 2 * bn_channels
    assert n_params(resnet18.non_trainable_weights) == 4 * bn_channels
    # Sites: stem + 16 block BNs + 3 shortcut BNs.
    assert len(split_bn_sites(single)) == len(split_bn_sites(resnet18)) == 20
    assert len(keras_bns(single)) == 20 and len(keras_bns(resnet18)) == 40
    # Convs feeding BNs have no bias; the classifier has one.
    convs = [l for l in resnet18._flatten_layers() if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 20 and not any(c.use_bias for c in convs)
    assert resnet18.graph.get_layer("linear").use_bias


def test_resnet18_forward_and_features(resnet18):
    assert isinstance(resnet18, ResNet18)
    x = images(seed=8)
    for branch in ("clean", "adv"):
        for training in (False, True):
            logits, feats = resnet18(x, training=training, branch=branch,
                                     return_features=True)
            assert tuple(logits.shape) == (BATCH, 10)
    assert tuple(feats) == resnet18.feature_names == (
        "layer4.0.bn1", "layer4.0.bn2", "layer4.1.bn1", "layer4.1.bn2", "pool")
    for name in resnet18.default_taps:
        assert tuple(feats[name].shape) == (BATCH, 4, 4, 512)
    assert tuple(feats["pool"].shape) == (BATCH, 512)
    assert resnet18.default_taps == resnet18.feature_names[:4]
    assert resnet18.default_invariance_weight == 30.0
    # bn2 is tapped before the residual add + ReLU, so it has negative values.
    assert float(keras.ops.min(feats["layer4.1.bn2"])) < 0.0


# --------------------------------------------------------------- WideResNet

def test_wrn34_10_parameter_count_and_taps():
    model = build_model("wrn34_10", split_bn=False)
    assert isinstance(model, WideResNet)
    assert (model.depth, model.width, model.blocks_per_stage) == (34, 10, 5)
    assert n_params(model.trainable_weights) == 46_160_474
    assert len(model.feature_names) == 11 and model.default_taps == model.feature_names
    assert model.feature_names[:2] == ("block3.0.relu1", "block3.0.relu2")
    assert model.feature_names[-1] == "pool"
    assert model.default_invariance_weight == 100.0


def _wrn_bn_channels(depth, k):
    n = (depth - 4) // 6
    widths = (16, 16 * k, 32 * k, 64 * k)
    total, in_planes = 0, widths[0]
    for out_planes in widths[1:]:
        for _ in range(n):
            total += in_planes + out_planes  # bn1 on the input, bn2 after conv1
            in_planes = out_planes
    return total + widths[-1]  # final BN


def test_wrn10_1_forward_features_and_split_params(wrn10_1):
    x = images(seed=9)
    for branch in ("clean", "adv"):
        for training in (False, True):
            logits, feats = wrn10_1(x, training=training, branch=branch,
                                    return_features=True)
            assert tuple(logits.shape) == (BATCH, 10)
    assert tuple(feats) == wrn10_1.feature_names == (
        "block3.0.relu1", "block3.0.relu2", "pool")
    # relu1 of the first last-stage block is its (32-channel, 16x16) input.
    assert tuple(feats["block3.0.relu1"].shape) == (BATCH, 16, 16, 32)
    assert tuple(feats["block3.0.relu2"].shape) == (BATCH, 8, 8, 64)
    assert tuple(feats["pool"].shape) == (BATCH, 64)
    single = WideResNet(depth=10, width=1, split_bn=False)
    bn_channels = _wrn_bn_channels(10, 1)
    assert len(split_bn_sites(single)) == len(split_bn_sites(wrn10_1)) == 7
    assert n_params(single.non_trainable_weights) == 2 * bn_channels
    assert (n_params(wrn10_1.trainable_weights)
            == n_params(single.trainable_weights) + 2 * bn_channels)
    assert n_params(wrn10_1.non_trainable_weights) == 4 * bn_channels


def test_wrn_initialisation(wrn10_1):
    conv2s = [l for l in wrn10_1.graph.layers if l.name.endswith(".conv2")]
    assert len(conv2s) == 3
    for conv in conv2s:
        init = conv.kernel_initializer
        assert isinstance(init, keras.initializers.RandomNormal)
        assert init.stddev == pytest.approx(np.sqrt(2.0 / (9 * conv.filters)))
    np.testing.assert_array_equal(to_np(wrn10_1.graph.get_layer("fc").bias), 0.0)


def test_wrn10_1_branches_differ_once_gammas_differ(wrn10_1):
    model = build_model("wrn10_1")
    x = images(seed=10)
    np_close(model(x, branch="clean"), model(x, branch="adv"), atol=0)
    bn = model.graph.get_layer("bn").branch_layer("clean")
    bn.gamma.assign(0.5 * np.ones(bn.gamma.shape))
    diff = to_np(model(x, branch="clean") - model(x, branch="adv"))
    assert np.max(np.abs(diff)) > 1e-4


def test_wrn_rejects_bad_depth():
    for depth in (11, 20, 4):
        with pytest.raises(ValueError, match="depth"):
            WideResNet(depth=depth, width=1)


# ------------------------------------------------------ PreAct ResNet-18

def test_preact_resnet18_forward_and_features():
    model = build_model("preact_resnet18", num_classes=100)
    assert isinstance(model, PreActResNet18)
    x = images(seed=11)
    for branch in ("clean", "adv"):
        logits, feats = model(x, training=False, branch=branch, return_features=True)
        assert tuple(logits.shape) == (BATCH, 100)
    assert tuple(feats) == model.feature_names
    assert tuple(feats["layer4.0.relu1"].shape) == (BATCH, 8, 8, 256)
    for name in ("layer4.0.relu2", "layer4.1.relu1", "layer4.1.relu2"):
        assert tuple(feats[name].shape) == (BATCH, 4, 4, 512)
    assert tuple(feats["pool"].shape) == (BATCH, 512)
    assert all(float(keras.ops.min(v)) >= 0.0 for v in feats.values())
    assert model.default_taps == model.feature_names[:4]
    assert model.default_invariance_weight == 30.0
    # No BN on the stem (pre-activation): 16 block BNs + the final BN.
    assert len(split_bn_sites(model)) == 17
    assert n_params(model.non_trainable_weights) == 4 * 3904


# ------------------------------------------------------------- build_model

def test_build_model_names_and_errors():
    assert set(MODEL_NAMES) == {"small_cnn", "resnet18", "wrn", "wrn34_10",
                                "wrn10_1", "preact_resnet18"}
    with pytest.raises(ValueError) as err:
        build_model("resnet50")
    for name in MODEL_NAMES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="input_shape must be"):
        build_model("wrn34_10", input_shape=None)
    wrn = build_model("wrn", depth=16, width=2, num_classes=5, input_shape=(16, 16, 1))
    assert (wrn.depth, wrn.width, wrn.num_classes) == (16, 2, 5)
    assert tuple(wrn(np.zeros((1, 16, 16, 1), np.float32)).shape) == (1, 5)
    with pytest.raises(ValueError):
        build_model("wrn10_1", depth=16)
    with pytest.raises(ValueError):
        build_model("wrn", depth=13, width=1)
    small = build_model("small_cnn", split_bn=False)
    assert small.built and not small.split_bn and len(small.weights) > 0


# ------------------------------------------------------------ save / load

def _perturb(model, x):
    """Move the clean statistics and make the adv gammas/betas distinct."""
    model(x, training=True, branch="clean")
    rng = np.random.default_rng(0)
    for site in split_bn_sites(model):
        bn = site.branch_layer("adv")
        bn.gamma.assign(rng.uniform(0.5, 1.5, bn.gamma.shape).astype("float32"))
        bn.beta.assign(rng.normal(0.0, 0.1, bn.beta.shape).astype("float32"))


# Keras' own saving code converts variables with np.array(); numpy 2 warns.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("name,kwargs", [("small_cnn", {"width": 8}),
                                         ("wrn10_1", {})])
def test_keras_save_load_round_trip(tmp_path, name, kwargs):
    model = build_model(name, num_classes=6, **kwargs)
    x = images(seed=12)
    _perturb(model, x)
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model)
    assert loaded.get_config() == model.get_config()
    for branch in ("clean", "adv"):
        a, fa = model(x, branch=branch, return_features=True)
        b, fb = loaded(x, branch=branch, return_features=True)
        np_close(a, b, atol=1e-6)
        assert tuple(fa) == tuple(fb)
        for k in fa:
            np_close(fa[k], fb[k], atol=1e-5)
    assert not np.allclose(to_np(loaded(x, branch="clean")),
                           to_np(loaded(x, branch="adv")))


def test_from_config_rebuilds_same_architecture():
    for model in (SmallCNN(num_classes=3, split_bn=False, width=4, dense_units=8),
                  WideResNet(num_classes=3, depth=16, width=2),
                  ResNet18(num_classes=3), PreActResNet18(split_bn=False)):
        clone = type(model).from_config(model.get_config())
        assert clone.get_config() == model.get_config()


# ------------------------------------------------- checkpoints of older versions

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "legacy")


@pytest.mark.parametrize("name,kwargs", [("small_cnn", {"width": 8}), ("resnet18", {}),
                                         ("wrn10_1", {}), ("preact_resnet18", {})])
def test_checkpoint_keys_of_the_subclassed_models_are_kept(name, kwargs):
    """The functional families save every weight under the key the subclassed models of
    earlier versions used (recorded in tests/fixtures/legacy/checkpoint_keys.json)."""
    from keras_arat import runs
    from keras_arat.training import TRAINERS
    with open(os.path.join(LEGACY, "checkpoint_keys.json")) as f:
        recorded = json.load(f)
    for split in (True, False):
        net = build_model(name, split_bn=split, **kwargs)
        trainer = TRAINERS["arat" if split else "pgd_at"](net)
        keys = sorted(runs.checkpoint_objects(trainer)["weights"])
        assert keys == recorded[f"{name}-split_bn={split}"]


def test_a_checkpoint_written_by_the_subclassed_model_loads_and_computes_the_same():
    from keras_arat import runs
    from keras_arat.training import TRAINERS
    from keras_arat.training.checkpoint import CheckpointManager
    net = build_model("small_cnn", width=4, dense_units=8)
    trainer = TRAINERS["arat"](net)
    manager = CheckpointManager(os.path.join(LEGACY, "small_cnn_w4", "checkpoints"),
                                **runs.checkpoint_objects(trainer))
    manager.restore(manager.latest()[1])
    expected = np.load(os.path.join(LEGACY, "small_cnn_w4", "expected.npz"))
    for branch in ("adv", "clean"):
        np.testing.assert_allclose(net(expected["x"], training=False, branch=branch).numpy(),
                                   expected[branch], rtol=0, atol=1e-6)
    assert float(trainer.a_prev.numpy()) == 0.375
