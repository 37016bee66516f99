"""CIFAR ResNet-18 (kuangliu / AR-AT layout) with split BatchNorm.

Also holds the helpers shared by the PyTorch-derived models: a Conv2D with
PyTorch's symmetric zero padding (PyTorch's default initialisers are in
keras_arat.layers.torch_init).
"""

import keras

from keras_arat.layers.split_batch_norm import SplitBatchNormalization
from keras_arat.layers.torch_init import torch_bias_initializer, torch_kernel_initializer
from keras_arat.network import SplitBNNetwork


@keras.saving.register_keras_serializable(package="keras_arat")
class TorchConv2D(keras.layers.Conv2D):
    """Conv2D (NHWC) padded like PyTorch's `Conv2d(padding=p)`.

    PyTorch pads `p` zeros on every side. Keras' "same" pads asymmetrically
    (extra zero at the bottom/right) when the stride is above one, which shifts
    the sampling grid, so here the padding is explicit and the convolution
    "valid". Where "same" coincides exactly with PyTorch (stride 1, odd kernel,
    p = (k - 1) // 2) Keras' own padding is used; p = 0 is plain "valid".
    """

    def __init__(self, filters, kernel_size, strides=1, torch_padding=0, **kwargs):
        kwargs.pop("padding", None)
        data_format = kwargs.pop("data_format", None) or "channels_last"
        if data_format != "channels_last":
            raise ValueError("TorchConv2D only supports channels_last (NHWC)")
        ks = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size,) * 2
        st = strides if isinstance(strides, (tuple, list)) else (strides,) * 2
        p = int(torch_padding)
        if p < 0:
            raise ValueError(f"torch_padding must be >= 0, got {torch_padding!r}")
        same_is_exact = (all(s == 1 for s in st)
                         and all(k % 2 == 1 and (k - 1) // 2 == p for k in ks))
        if p > 0 and same_is_exact:
            keras_padding, self_pad = "same", 0
        else:
            keras_padding, self_pad = "valid", p
        super().__init__(filters, kernel_size, strides=strides, padding=keras_padding,
                         data_format="channels_last", **kwargs)
        self.torch_padding = p
        self._explicit_pad = self_pad

    def _pad(self, x):
        p = self._explicit_pad
        return keras.ops.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])

    def call(self, inputs):
        if self._explicit_pad:
            inputs = self._pad(inputs)
        return super().call(inputs)

    def compute_output_shape(self, input_shape):
        if self._explicit_pad:
            p = 2 * self._explicit_pad
            input_shape = list(input_shape)
            for axis in (1, 2):
                if input_shape[axis] is not None:
                    input_shape[axis] += p
            input_shape = tuple(input_shape)
        return super().compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.pop("padding", None)
        config["torch_padding"] = self.torch_padding
        return config


def torch_conv(filters, kernel_size, stride, padding, name, kernel_initializer=None):
    """Bias-free conv with PyTorch padding (every conv here feeds a BN or a sum)."""
    return TorchConv2D(
        filters, kernel_size, strides=stride, torch_padding=padding, use_bias=False,
        kernel_initializer=kernel_initializer or torch_kernel_initializer(),
        name=name)


def positive_num_classes(num_classes):
    """num_classes as an int, or a ValueError naming the bad value."""
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
    return int(num_classes)


def input_dtype():
    """The images' dtype: float32 (also under mixed precision, the layers cast), float64
    under a float64 policy (a float32 Input would round the images)."""
    return logits_dtype()


def logits_dtype():
    """The classifier's dtype: float32 (also under mixed precision: attacks and losses
    need float32 logits), float64 under a float64 policy."""
    return "float64" if keras.config.dtype_policy().name == "float64" else "float32"


def float32_classifier(num_classes, name, bias_fan_in=None):
    """The final Dense: PyTorch's weight init, PyTorch's bias init over `bias_fan_in`
    inputs (zeros without it), float32 logits under a mixed-precision policy (attacks
    and losses need them), float64 ones under a float64 policy. The kernel's initializer
    is made first, as it always was, so a seeded model draws the same weights."""
    kernel_initializer = torch_kernel_initializer()
    bias_initializer = "zeros" if bias_fan_in is None else torch_bias_initializer(bias_fan_in)
    return keras.layers.Dense(num_classes, kernel_initializer=kernel_initializer,
                              bias_initializer=bias_initializer, name=name,
                              dtype=logits_dtype())


def bn_layer(split, name):
    return SplitBatchNormalization(split=split, name=name)


def stage_blocks(widths, strides, blocks_per_stage, prefix):
    """(layer-name prefix, feature prefix, planes, stride) of every residual block.

    Block i of stage s (from 1) has the layer prefix "{prefix}{s}_{i}" (its layers are
    "{prefix}{s}_{i}.conv1", ...) and the feature prefix "{prefix}{s}.{i}", as in the
    PyTorch module tree; only the first block of a stage strides.
    """
    for stage, (planes, stride, n) in enumerate(zip(widths, strides, blocks_per_stage), 1):
        for i in range(n):
            yield f"{prefix}{stage}_{i}", f"{prefix}{stage}.{i}", planes, stride if i == 0 else 1


def basic_block(x, in_planes, planes, stride, split, name):
    """conv3x3 -> bn1 -> relu -> conv3x3 -> bn2 -> (+ shortcut) -> relu.

    The shortcut is a 1x1 conv + BN when the stride or the width changes."""
    b1 = bn_layer(split, f"{name}.bn1")(torch_conv(planes, 3, stride, 1, f"{name}.conv1")(x))
    out = keras.layers.ReLU(name=f"{name}.relu1")(b1)
    b2 = bn_layer(split, f"{name}.bn2")(torch_conv(planes, 3, 1, 1, f"{name}.conv2")(out))
    if stride != 1 or in_planes != planes:
        short = torch_conv(planes, 1, stride, 0, f"{name}.shortcut_conv")(x)
        short = bn_layer(split, f"{name}.shortcut_bn")(short)
    else:
        short = x
    out = keras.layers.Add(name=f"{name}.add")([b2, short])
    return keras.layers.ReLU(name=f"{name}.relu2")(out)


@keras.saving.register_keras_serializable(package="keras_arat")
class ResNet18(SplitBNNetwork):
    """CIFAR ResNet-18: 3x3 stem (no max-pool), BasicBlocks 2-2-2-2.

    Widths 64, 128, 256, 512 with strides 1, 2, 2, 2, global average pooling and
    a Dense classifier. Initialisation follows PyTorch's defaults. A functional graph;
    block layers are named "layer{s}_{i}.conv1", ".bn1", ".conv2", ".bn2",
    ".shortcut_conv", ".shortcut_bn", ".add", ".relu1", ".relu2".

    Features: "layer4.{0,1}.bn1", "layer4.{0,1}.bn2" (raw BN outputs, bn2 before
    the residual addition) and "pool" (the pooled 512-d vector).
    """

    planes = (64, 128, 256, 512)
    strides = (1, 2, 2, 2)
    num_blocks = (2, 2, 2, 2)
    FEATURES = {"layer4.0.bn1": "layer4_0.bn1", "layer4.0.bn2": "layer4_0.bn2",
                "layer4.1.bn1": "layer4_1.bn1", "layer4.1.bn2": "layer4_1.bn2",
                "pool": "pool"}
    DEFAULT_TAPS = ("layer4.0.bn1", "layer4.0.bn2", "layer4.1.bn1", "layer4.1.bn2")

    def __init__(self, num_classes=10, split_bn=True, input_shape=(32, 32, 3),
                 name="resnet18", **kwargs):
        num_classes = positive_num_classes(num_classes)
        image_shape = tuple(int(d) for d in input_shape)
        split = bool(split_bn)
        with keras.name_scope(name):  # weight paths "<name>/<layer>/..."
            images = keras.Input(image_shape, name="images", dtype=input_dtype())
            x = torch_conv(64, 3, 1, 1, "conv1")(images)
            x = keras.layers.ReLU(name="relu")(bn_layer(split, "bn1")(x))
            in_planes = 64
            for layer, _, planes, stride in stage_blocks(self.planes, self.strides,
                                                         self.num_blocks, "layer"):
                x = basic_block(x, in_planes, planes, stride, split, layer)
                in_planes = planes
            pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x)
            logits = float32_classifier(num_classes, "linear", self.planes[-1])(pooled)
            graph = keras.Model(images, logits, name=name)
        super().__init__(graph, features=self.FEATURES, default_taps=self.DEFAULT_TAPS,
                         default_invariance_weight=30.0, name=name, **kwargs)
        self.num_classes, self.split_bn, self.image_shape = num_classes, split, image_shape

    def get_config(self):
        return {"name": self.name, "num_classes": self.num_classes, "split_bn": self.split_bn,
                "input_shape": list(self.image_shape)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
