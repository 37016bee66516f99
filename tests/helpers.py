"""Shared test fixtures: tiny models and the embedded digits, built once per process."""

import functools
import types

import keras
import numpy as np


@functools.lru_cache(maxsize=None)
def tiny_data(n_train=1024, n_test=256):
    """Embedded digits as float32 [0,1] arrays: .train = (x, y), .test = (x, y), .dataset."""
    from keras_arat.data import load_dataset
    ds = load_dataset("digits", n_train=n_train, n_test=n_test)
    to_float = lambda a: a.astype(np.float32) / 255.0  # noqa: E731
    return types.SimpleNamespace(train=(to_float(ds.x_train), ds.y_train),
                                 test=(to_float(ds.x_test), ds.y_test), dataset=ds)


def new_network(split_bn=True, width=8, seed=0, model="small_cnn", **kwargs):
    from keras_arat.models import build_model
    keras.utils.set_random_seed(seed)
    if model == "small_cnn":
        kwargs.setdefault("width", width)
    return build_model(model, num_classes=10, split_bn=split_bn, **kwargs)


@functools.lru_cache(maxsize=None)
def tiny_network(split_bn=False, trained=True):
    """A width-8 small CNN; trained=True gives it 3 epochs of standard training (~0.9 acc)."""
    from keras_arat.training import StandardModel, TorchSGD
    net = new_network(split_bn=split_bn)
    if trained:
        x, y = tiny_data().train
        trainer = StandardModel(net)
        trainer.compile(optimizer=TorchSGD(0.05, l2_weight_decay=0.0))
        trainer.fit(x, y, batch_size=64, epochs=3, verbose=0, shuffle=False)
    return net
