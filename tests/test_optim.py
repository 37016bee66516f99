"""TorchSGD is torch.optim.SGD (coupled decay); the LR schedule is the paper's."""

import numpy as np
import tensorflow as tf

from keras_arat.training.optim import EpochPiecewiseConstant, TorchSGD


def torch_sgd_reference(w, grads, lrs, momentum, wd):
    """torch.optim.SGD(momentum, weight_decay, dampening=0) written out in numpy."""
    buf = None
    for g, lr in zip(grads, lrs):
        d = g + wd * w
        buf = d.copy() if buf is None else momentum * buf + d
        w = w - lr * buf
    return w


def test_torch_sgd_matches_reference_across_lr_change():
    rng = np.random.RandomState(0)
    w0 = rng.randn(5).astype(np.float64)
    grads = [rng.randn(5) for _ in range(6)]
    schedule = EpochPiecewiseConstant(steps_per_epoch=2, boundaries=[1, 2], values=[0.5, 0.1, 0.01])
    var = tf.Variable(w0.astype(np.float32))
    opt = TorchSGD(schedule, momentum=0.9, l2_weight_decay=5e-2)
    lrs = []
    for g in grads:
        lrs.append(float(schedule(opt.iterations)))
        opt.apply([tf.constant(g, tf.float32)], [var])
    np.testing.assert_allclose(lrs, [0.5, 0.5, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
    expected = torch_sgd_reference(w0, grads, lrs, 0.9, 5e-2)
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-5, atol=1e-6)
    # Keras' own SGD (lr inside the buffer, decoupled decay) ends elsewhere.
    var_k = tf.Variable(w0.astype(np.float32))
    keras_opt = tf.keras.optimizers.SGD(0.5, momentum=0.9)
    for g in grads:
        keras_opt.apply([tf.constant(g, tf.float32)], [var_k])
    assert np.abs(var_k.numpy() - expected).max() > 1e-3


def test_paper_schedule():
    s = EpochPiecewiseConstant(steps_per_epoch=391, boundaries=[1, 76, 91],
                               values=[0.02, 0.1, 0.01, 0.001])
    by_epoch = {e + 1: s.value_at_epoch(e) for e in range(100)}
    assert by_epoch[1] == 0.02 and by_epoch[2] == 0.1 and by_epoch[76] == 0.1
    assert by_epoch[77] == 0.01 and by_epoch[91] == 0.01 and by_epoch[92] == 0.001
    assert by_epoch[100] == 0.001
    for step, lr in [(0, 0.02), (390, 0.02), (391, 0.1), (76 * 391 - 1, 0.1),
                     (76 * 391, 0.01), (91 * 391, 0.001)]:
        np.testing.assert_allclose(float(s(step)), lr, rtol=1e-6)


def test_schedule_rejects_mismatched_lists():
    import pytest
    with pytest.raises(ValueError, match="len"):
        EpochPiecewiseConstant(10, [1, 2], [0.1])
