"""A user's own Keras model: split BN by one call, ARAT by compile + fit, folding and export
through SavedModel and ONNX, for a Sequential CNN, a functional residual model and a
keras.applications model."""

import os

import keras
import numpy as np
import pytest

from keras_arat.deployed import OnnxRunner, SavedModelRunner
from keras_arat.export import convert, fold
from keras_arat.layers.split_batch_norm import SplitBatchNormalization
from keras_arat.network import SplitBNNetwork, to_split_bn
from tests.cli import assert_error, error_lines, run_cli

pytestmark = pytest.mark.slow  # end to end: subprocesses, training, export

ATOL = 1e-4  # the export contract's logit tolerance


def sequential_cnn():
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(16, 3, strides=2, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(32),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(name="embedding"),
        keras.layers.Dense(10, name="head"),
    ], name="user_sequential")


def residual_model():
    """Skip connections, a BN that reads a sum (no conv before it), a depthwise conv."""
    images = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(images)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    h = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    h = keras.layers.Conv2D(8, 1, use_bias=False)(h)
    x = keras.layers.Add()([x, h])
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(name="post_add_bn")(x))
    pooled = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    return keras.Model(images, keras.layers.Dense(10)(pooled), name="user_residual")


def applications_model():
    return keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                          weights=None, classes=10,
                                          classifier_activation=None)


USER_MODELS = {"sequential": sequential_cnn, "residual": residual_model,
               "mobilenet_v2": applications_model}


def randomize_statistics(model, seed=0):
    """Non-trivial BN statistics, so that folding errors cannot hide behind identities."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):  # noqa: SLF001
        if type(layer) is keras.layers.BatchNormalization:
            c = layer.moving_mean.shape[-1]
            layer.moving_mean.assign(rng.normal(0, 0.3, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
            if layer.center:
                layer.beta.assign(rng.normal(0, 0.2, c).astype("float32"))
    return model


def images(n=6, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n, 32, 32, 3)).astype("float32")


@pytest.fixture(scope="module", params=sorted(USER_MODELS))
def converted(request):
    keras.utils.set_random_seed(0)
    model = randomize_statistics(USER_MODELS[request.param]())
    return request.param, model, to_split_bn(model)


def test_to_split_bn_keeps_the_graph_and_starts_both_branches_from_the_weights(converted):
    name, model, net = converted
    bns = [l for l in model._flatten_layers(recursive=True)  # noqa: SLF001
           if isinstance(l, keras.layers.BatchNormalization)]
    splits = [l for l in net._flatten_layers(recursive=True)  # noqa: SLF001
              if isinstance(l, SplitBatchNormalization)]
    assert len(splits) == len(bns) > 0 and all(s.split for s in splits)
    assert not [l for l in net.graph.layers if type(l) is keras.layers.BatchNormalization]
    x = images()
    want = model(x, training=False).numpy()
    for branch in ("clean", "adv"):
        np.testing.assert_allclose(net(x, training=False, branch=branch).numpy(), want,
                                   atol=1e-5, rtol=0)
    # Branch selection: moving the adv branch's statistics changes that branch only.
    for site in splits:
        site.branch_layer("adv").moving_mean.assign(site.branch_layer("adv").moving_mean + 0.5)
    try:
        np.testing.assert_allclose(net(x, training=False, branch="clean").numpy(), want,
                                   atol=1e-5, rtol=0)
        assert np.max(np.abs(net(x, training=False, branch="adv").numpy() - want)) > 1e-3
    finally:
        for site in splits:
            site.branch_layer("adv").moving_mean.assign(
                site.branch_layer("adv").moving_mean - 0.5)
    # The original model is a separate copy: converting and training leave it alone.
    assert all(id(w) not in {id(v) for v in net.weights} for w in model.weights)
    # Features by layer name; the default tap is the classifier's input.
    logits, feats = net(x, branch="adv", return_features=True)
    (tap,) = net.default_taps
    assert tuple(feats) == (tap,) and feats[tap].shape[0] == len(x)
    assert tap == {"sequential": "embedding", "residual": "pooled"}.get(name, tap)


def test_fold_exports_every_user_model_within_the_tolerance(converted, tmp_path):
    name, _, net = converted
    x = images(8)
    for branch in ("adv", "clean"):
        folded = fold.fold_network(net, branch)
        assert fold.count_layers(folded, keras.layers.BatchNormalization) == 0
        assert fold.count_layers(folded, SplitBatchNormalization) == 0
        want = net(x, training=False, branch=branch).numpy()
        np.testing.assert_allclose(folded(x).numpy(), want, atol=ATOL, rtol=0)
    sm = convert.saved_model_dir(str(tmp_path), name)
    convert.save_saved_model(folded, sm, (32, 32, 3))
    np.testing.assert_allclose(SavedModelRunner(sm).predict(x), want, atol=ATOL, rtol=0)
    onnx_path = str(tmp_path / "model.onnx")
    convert.onnx_from_saved_model(sm, onnx_path, (32, 32, 3))
    assert convert.check_onnx(onnx_path) == []  # no BatchNormalization node, dynamic batch
    np.testing.assert_allclose(OnnxRunner(onnx_path)(x), want, atol=ATOL, rtol=0)
    diffs = {"folded": np.max(np.abs(folded(x).numpy() - want)),
             "saved_model": np.max(np.abs(SavedModelRunner(sm).predict(x) - want)),
             "onnxruntime": np.max(np.abs(OnnxRunner(onnx_path)(x) - want))}
    print(f"{name}: max abs logit difference of the folded clean branch: "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


def test_a_subclassed_block_with_bn_inside_is_one_clear_error():
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = keras.layers.Conv2D(4, 3, padding="same")
            self.norm = keras.layers.BatchNormalization(name="inner_bn")

        def call(self, x, training=None):
            return self.norm(self.conv(x), training=training)

    images_in = keras.Input((8, 8, 3))
    out = keras.layers.Dense(3)(keras.layers.Flatten()(Block(name="my_block")(images_in)))
    model = keras.Model(images_in, out)
    with pytest.raises(ValueError, match="cannot rewrite layer 'my_block' .*'inner_bn'"):
        to_split_bn(model)


def test_the_converted_network_saves_and_loads_as_keras(converted, tmp_path):
    name, _, net = converted
    if name == "mobilenet_v2":
        pytest.skip("the same code path as the other two, ten times the size")
    path = str(tmp_path / "net.keras")
    net.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, SplitBNNetwork) and loaded.default_taps == net.default_taps
    x = images()
    for branch in ("clean", "adv"):
        np.testing.assert_allclose(loaded(x, training=False, branch=branch).numpy(),
                                   net(x, training=False, branch=branch).numpy(),
                                   atol=1e-6, rtol=0)


def test_arat_fit_on_a_converted_model_keeps_a_prev_by_itself():
    from keras_arat.training import ARATModel, TorchSGD
    from tests import helpers
    keras.utils.set_random_seed(0)
    net = to_split_bn(sequential_cnn())
    trainer = ARATModel(net, eps=0.2, step_size=0.05, attack_steps=2, a_prev_examples=256)
    trainer.compile(optimizer=TorchSGD(0.05))
    x, y = helpers.tiny_data().train
    assert float(trainer.a_prev.numpy()) == 0.0
    history = trainer.fit(x[:512], y[:512], batch_size=64, epochs=2, verbose=0)
    # a_prev is measured at each epoch start: near chance at first, above it once trained.
    first, second = history.history["a_prev"]
    assert 0.0 < first < 0.35 and second > first + 0.2, (first, second)
    # The same with a tf.data.Dataset of batches.
    import tensorflow as tf
    data = tf.data.Dataset.from_tensor_slices((x[:256], y[:256])).batch(64)
    trainer.a_prev.assign(0.0)
    trainer.fit(data, epochs=1, verbose=0)
    assert float(trainer.a_prev.numpy()) > 0.3


def test_to_split_bn_refuses_what_it_cannot_read():
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="subclassed"):
        to_split_bn(Subclassed())
    with pytest.raises(ValueError, match="no defined input"):
        to_split_bn(keras.Sequential([keras.layers.Dense(2)]))


def operator_model():
    """Operators on KerasTensors (h * 0.5 + 1, keras.ops calls), a BN whose input is a
    sum, and an operation (keras.ops.mean) as the classifier's input."""
    images = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(images)
    x = keras.layers.BatchNormalization()(x)
    x = keras.ops.relu(x * 0.5 + 1.0)
    h = keras.layers.Conv2D(8, 3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x + h)
    pooled = keras.ops.mean(keras.ops.maximum(x, 0.0), axis=[1, 2])
    return keras.Model(images, keras.layers.Dense(10)(pooled), name="user_operators")


# keras.applications families with BatchNormalization at 32x32, weights=None. MobileNetV3
# applies operators to KerasTensors (hard_sigmoid: x + 3, * 1/6); EfficientNet holds a
# Normalization layer whose mean the ONNX conversion must freeze; NASNet has separable
# convolutions and many concatenations. (The ResNets and EfficientNetV2 at 32x32 reach
# 1x1 feature maps whose BN statistics, after two steps on 8 images, blow the logits up to
# 1e3-1e10, where float32 alone differs by more than 1e-4 between runtimes.)
APPLICATIONS = {"MobileNetV3Small": {}, "DenseNet121": {}, "EfficientNetB0": {},
                "MobileNetV2": {"alpha": 0.35}, "NASNetMobile": {}}


def application(name):
    return getattr(keras.applications, name)(input_shape=(32, 32, 3), weights=None,
                                               classes=10, classifier_activation=None,
                                               **APPLICATIONS[name])


@pytest.mark.parametrize("name", ["operators", *APPLICATIONS])
def test_arat_steps_then_export_on_graphs_with_operators_and_applications(name, tmp_path):
    """to_split_bn, two ARAT steps (run eagerly: tracing these graphs costs more than
    the steps), then export_model: no BatchNormalization node left in the ONNX graph, and
    every format within 1e-4 of the split-BN network's logits."""
    from keras_arat import export_model
    from keras_arat.training import ARATModel, TorchSGD
    from tests import helpers
    keras.utils.set_random_seed(0)
    # The applications keep Keras' initial BN statistics: two steps then move them.
    model = randomize_statistics(operator_model()) if name == "operators" else \
        application(name)
    net = to_split_bn(model, momentum=0.9)
    x = images(8)
    np.testing.assert_allclose(net(x, training=False).numpy(),
                               model(x, training=False).numpy(), atol=1e-5, rtol=0)
    (xt, yt), (xe, ye) = helpers.tiny_data().train, helpers.tiny_data().test
    arat = ARATModel(net, eps=0.03, step_size=0.01, attack_steps=1)
    arat.compile(optimizer=TorchSGD(0.01), run_eagerly=True)
    history = arat.fit(xt[:16], yt[:16], batch_size=8, epochs=1, verbose=0)
    assert int(arat.optimizer.iterations.numpy()) == 2
    assert np.isfinite(history.history["loss"][0])
    report = export_model(net, str(tmp_path / "out"), x=xe[:16], y=ye[:16])
    diffs = report["max_abs_logit_diff_vs_original"]
    print(f"{name}: {diffs}")
    assert report["passed"] and max(diffs.values()) <= ATOL
    assert "BatchNormalization" not in report["onnx"]["op_types"]
    assert report["accuracy"]["onnxruntime"] == report["accuracy"]["original"]


def test_a_graph_without_batch_norm_passes_through_with_a_note(capsys, tmp_path):
    """ConvNeXt has LayerNormalization, no BatchNormalization: to_split_bn and fold_bn
    pass it through with a one-line note each (its branches are the same network)."""
    from keras_arat import fold_bn
    model = keras.applications.ConvNeXtTiny(input_shape=(32, 32, 3), weights=None,
                                            classes=10, classifier_activation=None)
    net = to_split_bn(model)
    folded = fold_bn(net)
    err = capsys.readouterr().err
    assert "has no BatchNormalization: nothing to split" in err
    assert "has no BatchNormalization: nothing to fold" in err
    x = images(4)
    want = model(x, training=False).numpy()
    for out in (net(x, training=False, branch="clean"), net(x, training=False, branch="adv"),
                folded(x)):
        np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=0)


def test_the_output_model_takes_images_as_its_input():
    net = to_split_bn(sequential_cnn())
    folded = fold.fold_network(net, "adv")
    assert folded.input.name == "images" and os.path.basename(folded.name)


# --- the command lines meet users' files ------------------------------------------------

@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A user's Sequential model (.keras) and its Keras `model.export()` SavedModel, whose
    serving input is named after the model's input layer, not "images"."""
    folder = tmp_path_factory.mktemp("user")
    keras.utils.set_random_seed(1)
    model = randomize_statistics(sequential_cnn())
    keras_file = str(folder / "user.keras")
    model.save(keras_file)
    exported = str(folder / "exported")
    model.export(exported, format="tf_saved_model", verbose=False)
    return model, keras_file, exported, folder


def test_export_takes_any_keras_model_file(user_files, tmp_path):
    import json
    model, keras_file, _, _ = user_files
    out = str(tmp_path / "out")
    proc = run_cli("export", f"--keras_model={keras_file}", f"--out={out}", "--eps=0.1",
                   "--n_examples=32", "--pgd_examples=16", "--formats=saved_model,onnx")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(os.path.join(out, "export_report.json")))
    assert report["passed"] and report["onnx"]["checker"] == "passed"
    assert "BatchNormalization" not in report["onnx"]["op_types"]
    assert max(report["max_abs_logit_diff_vs_original"].values()) <= ATOL
    assert report["network"]["class"] == "Sequential"


def test_evaluate_takes_a_keras_export_and_users_test_images(user_files, tmp_path):
    import json
    from tests import helpers
    model, _, exported, folder = user_files
    x, y = helpers.tiny_data().test
    x8 = np.round(x[:12] * 255).astype(np.uint8)
    # an .npz with only the test split
    npz = str(folder / "test_only.npz")
    np.savez(npz, x_test=x8, y_test=y[:12])
    # a folder with one sub-folder of PNG images per class
    import tensorflow as tf
    images = folder / "images"
    for i, (image, label) in enumerate(zip(x8, y[:12])):
        (images / f"class_{label}").mkdir(parents=True, exist_ok=True)
        tf.io.write_file(str(images / f"class_{label}" / f"{i:03d}.png"),
                         tf.io.encode_png(image))
    want = model(x[:12], training=False).numpy()
    accuracy = float(np.mean(np.argmax(want, -1) == y[:12]))
    for spec, n in ((f"npz:{npz}", 12), (f"folder:{images}", 12)):
        proc = run_cli("keras_arat.evaluate", f"--saved_model={exported}", f"--dataset={spec}",
                       "--eps=0.1", "--attacks=clean,pgd20", "--noprogress")
        assert proc.returncode == 0, proc.stderr[-3000:]
        (entry,) = json.loads(proc.stdout)["evaluated"]
        assert entry["n_examples"] == n and entry["input_name"] != "images"
        if spec.startswith("npz"):  # same images and labels as the model's own check
            assert entry["accuracy"]["clean"] == pytest.approx(accuracy)
        assert entry["accuracy"]["pgd20"] <= entry["accuracy"]["clean"]
    proc = run_cli("keras_arat.evaluate", f"--saved_model={exported}", "--input_name=nope",
                   "--attacks=clean")
    assert_error(proc, "has no input 'nope'")


def test_images_that_do_not_fit_the_model_are_one_error_line(user_files, tmp_path):
    _, _, exported, _ = user_files
    small = str(tmp_path / "small.npz")
    np.savez(small, x_test=np.zeros((4, 28, 28, 1), np.uint8), y_test=np.zeros(4, np.int64))
    proc = run_cli("keras_arat.evaluate", f"--saved_model={exported}", f"--dataset={small}",
                   "--attacks=clean")
    assert_error(proc, "the images are 28x28x1 but")
    assert "takes 32x32x3" in error_lines(proc)[0]
    empty = tmp_path / "no_classes"
    empty.mkdir()
    proc = run_cli("keras_arat.evaluate", f"--saved_model={exported}",
                   f"--dataset=folder:{empty}", "--attacks=clean")
    assert_error(proc, "has no sub-folders")
