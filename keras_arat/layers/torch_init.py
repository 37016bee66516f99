"""PyTorch's default initialisers, in Keras: what a freshly built torch.nn layer holds.

Used by every PyTorch-derived network (ResNet-18, WRN, the classifier heads) and by
ARAT's predictors, whose official code builds them from torch.nn.Linear defaults.
"""

import math

import keras


def torch_kernel_initializer():
    """PyTorch's default Conv/Linear weight init, kaiming_uniform(a=sqrt(5)).

    That is U(-b, b) with b = 1/sqrt(fan_in), i.e. variance scaling with
    scale 1/3 over fan_in. A fresh instance per layer.
    """
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform")


def torch_bias_initializer(fan_in):
    """PyTorch's default Linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(minval=-bound, maxval=bound)
