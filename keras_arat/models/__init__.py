"""Model families with split BatchNorm, and `build_model` to make them by name.

Every family is a functional Keras graph behind keras_arat.network.SplitBNNetwork, the
same contract a user's model gets from keras_arat.to_split_bn.
"""

from keras_arat.config import MODEL_NAMES
from keras_arat.models.preact_resnet import PreActResNet18
from keras_arat.models.resnet import ResNet18, TorchConv2D
from keras_arat.models.small_cnn import SmallCNN
from keras_arat.models.wide_resnet import WideResNet

# Fixed (depth, width) of the WRN aliases.
_WRN_ALIASES = {"wrn34_10": (34, 10), "wrn10_1": (10, 1)}
FAMILIES = {"small_cnn": SmallCNN, "resnet18": ResNet18, "wrn": WideResNet,
            "preact_resnet18": PreActResNet18}
assert set(MODEL_NAMES) == set(FAMILIES) | set(_WRN_ALIASES), "config.MODEL_NAMES"


def build_model(name, num_classes=10, split_bn=True, input_shape=(32, 32, 3), **kwargs):
    """Make the model `name` (one of MODEL_NAMES), its weights built for images of
    `input_shape` (H, W, C).

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
    if input_shape is None or len(tuple(input_shape)) != 3:
        raise ValueError(f"input_shape must be (H, W, C), got {input_shape!r}")
    return FAMILIES[key](num_classes=num_classes, split_bn=split_bn,
                         input_shape=tuple(input_shape), **kwargs)


__all__ = ["FAMILIES", "MODEL_NAMES", "PreActResNet18", "ResNet18", "SmallCNN", "TorchConv2D",
           "WideResNet", "build_model"]
