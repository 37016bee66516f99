"""Model families with split BatchNorm, and `build_model` to make them by name."""

import keras

from keras_arat.models.preact_resnet import PreActBlock, PreActResNet18
from keras_arat.models.resnet import BasicBlock, ResNet18, TorchConv2D
from keras_arat.models.small_cnn import SmallCNN
from keras_arat.models.wide_resnet import WideBasicBlock, WideResNet

# Fixed (depth, width) of the WRN aliases.
_WRN_ALIASES = {"wrn34_10": (34, 10), "wrn10_1": (10, 1)}

MODEL_NAMES = ("small_cnn", "resnet18", "wrn", "wrn34_10", "wrn10_1",
               "preact_resnet18")


def build_model(name, num_classes=10, split_bn=True, input_shape=(32, 32, 3),
                **kwargs):
    """Make the model `name` (one of MODEL_NAMES) and build its weights.

    The model is built by calling it once, in inference mode, on zeros of shape
    (1, *input_shape); pass `input_shape=None` to get an unbuilt model.
    Extra keyword arguments go to the model's constructor ("wrn" takes `depth`
    and `width`; "small_cnn" takes `width` and `dense_units`). The aliases
    "wrn34_10" and "wrn10_1" fix depth and width.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; valid names are: "
                         + ", ".join(MODEL_NAMES))
    if key in _WRN_ALIASES:
        depth, width = _WRN_ALIASES[key]
        for arg, fixed in (("depth", depth), ("width", width)):
            if arg in kwargs and kwargs[arg] != fixed:
                raise ValueError(f"{name!r} fixes {arg}={fixed}, got {arg}={kwargs[arg]!r}")
        kwargs.update(depth=depth, width=width)
        key = "wrn"
    cls = {"small_cnn": SmallCNN, "resnet18": ResNet18, "wrn": WideResNet,
           "preact_resnet18": PreActResNet18}[key]
    model = cls(num_classes=num_classes, split_bn=split_bn, **kwargs)
    if input_shape is not None:
        model(keras.ops.zeros((1,) + tuple(input_shape), dtype="float32"),
              training=False)
    return model


__all__ = [
    "MODEL_NAMES", "build_model",
    "SmallCNN", "ResNet18", "WideResNet", "PreActResNet18",
    "BasicBlock", "WideBasicBlock", "PreActBlock", "TorchConv2D",
]
