"""The official code's remaining details, against tests/fixtures/torch_details.npz.

tests/fixtures/make_torch_reference.py --details ran the official AR-AT code (torch, in a
side environment) for: the symmetric ablation ("x<->y"), the predictor's initial weights
(torch.nn defaults) and how many training images train_ARAT.py's test_single_bn reads for
a_prev. Here keras_arat is checked against those figures, without torch. Tolerances as in
tests/test_torch_equivalence.py: losses 1e-5 relative (float32), gradients 1e-10 of each
tensor's norm (float64).
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_arat.attacks import APGD, FABTargeted
from keras_arat.data import a_prev_batches, make_train_dataset
from keras_arat.training import ARATModel, TorchSGD
from keras_arat.training.arat import Predictor, a_prev_sampler
from keras_arat.training.callbacks import branch_accuracy
from tests import helpers
from tests.test_torch_equivalence import REF, Split, arat_loss, float64_split, rel_norm

DETAILS = dict(np.load(os.path.join(os.path.dirname(__file__), "fixtures",
                                    "torch_details.npz")))


def test_symmetric_ablation_is_the_official_x_y_loss():
    """--invariance=symmetric is loss.py's "x<->y": 1 - cos(z', z), no predictor (the
    official AlignLoss builds one and leaves it out of the loss: it gets no gradient) and
    no stop-gradient."""
    used, built = DETAILS["sym_predictor_params_without_gradient"]
    assert used == built == 20  # the official predictors: built, never used
    split = Split(invariance="symmetric")
    assert split.trainer.predictors == [] and not split.trainer.use_predictor
    split.reset()
    loss, logs = arat_loss(split, REF["r18_x"], REF["r18_x_adv"])
    for name, got in (("loss", loss), ("ce_adv", logs["ce_adv"]),
                      ("ce_clean", logs["ce_clean"]), ("invariance", logs["invariance"])):
        want = float(DETAILS[f"sym_{name}"])
        assert abs(float(got) - want) <= 1e-5 * abs(want), (name, float(got), want)


def test_symmetric_ablation_gradients_in_float64():
    """The gradients reach both branches through the invariance term, as the official
    code's: every BN of both branches, the stem conv and fc, to 1e-10 of their norm."""
    split = float64_split(invariance="symmetric")
    split.reset()
    variables = split.trainer.trainable_variables
    with tf.GradientTape() as tape:
        loss, _ = arat_loss(split, REF["r18_x"], REF["r18_x_adv"])
    grads = dict(zip([id(v) for v in variables], tape.gradient(loss, variables)))
    keys = [k.split("/", 1)[1] for k in DETAILS if k.startswith("sym_grad64/")]
    assert {"layer4.1.bn2.clean.weight", "layer4.1.bn2.adv.weight", "conv1.weight"} <= \
        set(keys)
    worst = max(rel_norm(split.torch_value(k, grads[id(split.by_key[k][0])].numpy()),
                         DETAILS[f"sym_grad64/{k}"]) for k in keys)
    print(f"{len(keys)} float64 gradients of the symmetric loss: largest difference "
          f"{worst:.1e} of the norm")
    assert worst < 1e-10


@pytest.mark.parametrize("dim", [512, 640])
def test_predictor_starts_as_the_official_torch_layers(dim):
    """Linear weights and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), BatchNorm1d gamma 1 and
    beta 0: each tensor's largest magnitude and spread as the official predictor's (2% for
    the 65k-value kernels, 10% for the biases: a sample's spread varies ~2% there)."""
    keras.utils.set_random_seed(0)
    p = Predictor(dim)
    p.build((None, dim))
    ours = {"predictor_x.0.weight": p.hidden.kernel, "predictor_x.1.weight": p.bn.gamma,
            "predictor_x.1.bias": p.bn.beta, "predictor_x.3.weight": p.out.kernel,
            "predictor_x.3.bias": p.out.bias}
    assert len(p.weights) == 7  # the 5 above and the BN's moving statistics
    for key, variable in ours.items():
        maxabs, mean, std, lo, hi, size = DETAILS[f"pred_init_d{dim}/{key}"]
        v = variable.numpy().astype(np.float64)
        assert v.size == size, key
        if std == 0.0:  # BatchNorm1d: constant
            np.testing.assert_array_equal(v, np.full(v.shape, lo), err_msg=key)
            continue
        tol = 0.02 if size > 10000 else 0.10
        assert abs(np.abs(v).max() / maxabs - 1) <= tol, (key, np.abs(v).max(), maxabs)
        assert abs(v.std() / std - 1) <= tol, (key, v.std(), std)
        assert abs(v.mean()) <= 4 * std / np.sqrt(size), (key, v.mean())


@pytest.mark.parametrize("batch_size", [64, 100, 128, 256, 512])
def test_a_prev_reads_as_many_training_images_as_the_official_code(batch_size):
    """test_single_bn(max_n=1000) reads whole batches until it has 1,000 images or more."""
    data = helpers.tiny_data(n_train=2048).dataset
    x, y = a_prev_batches(data, 1000, batch_size, seed=0, epoch=0, crop_padding=2)
    assert len(x) == len(y) == int(DETAILS[f"a_prev_images/{batch_size}"])


def test_a_prev_subset_is_new_each_epoch_augmented_and_resumable():
    data = helpers.tiny_data().dataset
    x0, y0 = a_prev_batches(data, 256, 64, seed=0, epoch=0, crop_padding=2)
    again, _ = a_prev_batches(data, 256, 64, seed=0, epoch=0, crop_padding=2)
    x1, _ = a_prev_batches(data, 256, 64, seed=0, epoch=1, crop_padding=2)
    np.testing.assert_array_equal(x0, again)  # (seed, epoch) fixes it: a resumed run's
    assert x0.shape == (256, 32, 32, 3) and x0.dtype == np.float32
    assert not np.array_equal(x0, x1)  # a new sample at the next epoch
    # Augmented: a random crop of the padded image, so most are no raw training image.
    raw = data.x_train.astype(np.float32) / 255.0
    as_raw = sum(bool(np.any(np.all(raw == img, axis=(1, 2, 3)))) for img in x0[:32])
    assert as_raw < 16, as_raw
    # A stream of its own: not the epoch's own first training batches.
    train, _ = make_train_dataset(data, 64, 1, 0, crop_padding=2)
    first = next(iter(train))[0].numpy()
    assert not np.array_equal(first, x0[:64])


def test_fit_measures_a_prev_on_a_new_sample_each_epoch():
    """ARATModel.fit's own sampler on arrays: whole batches of fit's batch size until at
    least a_prev_examples images, a new random sample at each epoch, the same one for the
    same (seed, epoch); fit sets a_prev from it at every epoch start."""
    x, y = helpers.tiny_data().train
    x, y = x[:256], y[:256]
    sample = a_prev_sampler(x, y, 100, seed=0, batch_size=64)
    (x0, y0), (x1, _), (again, _) = sample(0), sample(1), sample(0)
    assert len(x0) == len(y0) == len(x1) == 128  # two batches of 64 reach 100
    assert not np.array_equal(x0, x1)
    np.testing.assert_array_equal(x0, again)
    rows = {img.tobytes(): label for img, label in zip(x, y)}
    assert all(rows[img.tobytes()] == label for img, label in zip(x0, y0))

    net = helpers.new_network(split_bn=True)
    trainer = ARATModel(net, eps=0.2, step_size=0.1, attack_steps=1, a_prev_examples=100)
    trainer.compile(optimizer=TorchSGD(0.05))
    predict = lambda z: net(z, training=False, branch="clean")  # noqa: E731
    for epoch in range(2):  # the clean branch's accuracy on this epoch's sample, at its start
        want = branch_accuracy(predict, *sample(epoch))
        history = trainer.fit(x, y, batch_size=64, epochs=epoch + 1, initial_epoch=epoch,
                              verbose=0)
        assert history.history["a_prev"] == [pytest.approx(want, abs=1e-6)]


def test_targeted_attacks_read_the_class_count_from_the_logits():
    """APGD-T and FAB-T take min(n_target_classes, classes - 1) targets, the class count
    read from the logits even when their static shape does not give it (no fixed 10)."""
    weights = tf.constant(np.random.default_rng(0).normal(0, 1, (64, 4)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32)])
    def four_classes(z):  # logits of static shape [None, None]
        logits = tf.matmul(tf.reshape(z, [-1, 64]), weights)
        return tf.reshape(logits, tf.stack([tf.shape(z)[0], -1]))

    x = np.random.default_rng(1).uniform(0, 1, (6, 8, 8, 1)).astype(np.float32)
    y = np.argmax(four_classes(x).numpy(), 1).astype(np.int64)
    assert four_classes.get_concrete_function().structured_outputs.shape.as_list() == \
        [None, None]
    for attack in (APGD(eps=0.3, loss="dlr-targeted", n_iter=3, n_target_classes=9),
                   FABTargeted(eps=0.3, n_iter=3, n_target_classes=9)):
        x_adv = attack(four_classes, x, y, tf.constant([0, 0], tf.int64)).numpy()
        assert np.abs(x_adv - x).max() <= 0.3 + 1e-6
        assert np.mean(np.argmax(four_classes(x_adv).numpy(), 1) != y) > 0  # it attacked
