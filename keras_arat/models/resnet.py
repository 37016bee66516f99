"""CIFAR ResNet-18 (kuangliu / AR-AT layout) with split BatchNorm.

Also holds the helpers shared by the PyTorch-derived models: a Conv2D with
PyTorch's symmetric zero padding and PyTorch's default initialisers.
"""

import math

import keras

from keras_arat.layers.split_batch_norm import SplitBatchNormalization


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


def build_stages(block_cls, in_planes, widths, strides, blocks_per_stage, split_bn, prefix):
    """The residual blocks of every stage, and their dotted names, as parallel lists.

    Stage s (from 1) has blocks_per_stage[s-1] blocks of width widths[s-1]; only its
    first block strides. Block i of stage s is the layer "{prefix}{s}_{i}" and is named
    "{prefix}{s}.{i}" in feature keys, as in the PyTorch module tree.
    """
    blocks, names = [], []
    for stage, (planes, stride, n) in enumerate(zip(widths, strides, blocks_per_stage), 1):
        for i in range(n):
            blocks.append(block_cls(in_planes, planes, stride if i == 0 else 1,
                                    split_bn=split_bn, name=f"{prefix}{stage}_{i}"))
            names.append(f"{prefix}{stage}.{i}")
            in_planes = planes
    return blocks, names


def run_blocks(blocks, names, x, tapped_stage, feature_keys, training, branch):
    """Runs the blocks in order; returns the output and, for every block of
    `tapped_stage` (a name prefix such as "layer4."), its features as "{name}.{key}"."""
    feats = {}
    for name, block in zip(names, blocks):
        if name.startswith(tapped_stage):
            x, block_feats = block(x, training=training, branch=branch,
                                   return_features=True)
            feats.update((f"{name}.{key}", block_feats[key]) for key in feature_keys)
        else:
            x = block(x, training=training, branch=branch)
    return x, feats


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


def logits_dtype():
    """The classifier's dtype: float32 (also under mixed precision: attacks and losses
    need float32 logits), float64 under a float64 policy."""
    return "float64" if keras.config.dtype_policy().name == "float64" else "float32"


class ResidualBlock(keras.layers.Layer):
    """What every residual block shares: its channels in and out, its stride, split BN.

    Subclasses build their layers after calling this __init__ and implement `call`.
    """

    def __init__(self, in_planes, planes, stride=1, split_bn=True, **kwargs):
        super().__init__(**kwargs)
        self.in_planes = int(in_planes)
        self.planes = int(planes)
        self.stride = int(stride)
        self.split_bn = bool(split_bn)

    def compute_output_shape(self, input_shape):
        h, w = input_shape[1], input_shape[2]
        h = None if h is None else (h - 1) // self.stride + 1
        w = None if w is None else (w - 1) // self.stride + 1
        return (input_shape[0], h, w, self.planes)

    def get_config(self):
        config = super().get_config()
        config.update(in_planes=self.in_planes, planes=self.planes,
                      stride=self.stride, split_bn=self.split_bn)
        return config


@keras.saving.register_keras_serializable(package="keras_arat")
class BasicBlock(ResidualBlock):
    """conv3x3 -> bn1 -> relu -> conv3x3 -> bn2 -> (+ shortcut) -> relu.

    The shortcut is a 1x1 conv + BN when the stride or the width changes.
    Features: "bn1", "bn2" (bn2 before the residual addition).
    """

    def __init__(self, in_planes, planes, stride=1, split_bn=True, **kwargs):
        super().__init__(in_planes, planes, stride, split_bn, **kwargs)
        self.conv1 = torch_conv(self.planes, 3, self.stride, 1, "conv1")
        self.bn1 = SplitBatchNormalization(split=self.split_bn, name="bn1")
        self.conv2 = torch_conv(self.planes, 3, 1, 1, "conv2")
        self.bn2 = SplitBatchNormalization(split=self.split_bn, name="bn2")
        self.has_shortcut = self.stride != 1 or self.in_planes != self.planes
        if self.has_shortcut:
            self.shortcut_conv = torch_conv(self.planes, 1, self.stride, 0,
                                            "shortcut_conv")
            self.shortcut_bn = SplitBatchNormalization(split=self.split_bn,
                                                       name="shortcut_bn")

    def call(self, inputs, training=None, branch="adv", return_features=False):
        b1 = self.bn1(self.conv1(inputs), training=training, branch=branch)
        out = keras.ops.relu(b1)
        b2 = self.bn2(self.conv2(out), training=training, branch=branch)
        if self.has_shortcut:
            short = self.shortcut_bn(self.shortcut_conv(inputs), training=training,
                                     branch=branch)
        else:
            short = inputs
        out = keras.ops.relu(b2 + short)
        if return_features:
            return out, {"bn1": b1, "bn2": b2}
        return out


@keras.saving.register_keras_serializable(package="keras_arat")
class ResNet18(keras.Model):
    """CIFAR ResNet-18: 3x3 stem (no max-pool), BasicBlocks 2-2-2-2.

    Widths 64, 128, 256, 512 with strides 1, 2, 2, 2, global average pooling and
    a Dense classifier. Initialisation follows PyTorch's defaults.

    Features: "layer4.{0,1}.bn1", "layer4.{0,1}.bn2" (raw BN outputs, bn2 before
    the residual addition) and "pool" (the pooled 512-d vector).
    """

    tap_names = ("layer4.0.bn1", "layer4.0.bn2", "layer4.1.bn1", "layer4.1.bn2",
                 "pool")
    default_taps = ("layer4.0.bn1", "layer4.0.bn2", "layer4.1.bn1", "layer4.1.bn2")
    default_invariance_weight = 30.0

    planes = (64, 128, 256, 512)
    strides = (1, 2, 2, 2)
    num_blocks = (2, 2, 2, 2)

    def __init__(self, num_classes=10, split_bn=True, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = positive_num_classes(num_classes)
        self.split_bn = bool(split_bn)
        self.conv1 = torch_conv(64, 3, 1, 1, "conv1")
        self.bn1 = SplitBatchNormalization(split=self.split_bn, name="bn1")
        self.blocks, self.block_names = build_stages(
            BasicBlock, 64, self.planes, self.strides, self.num_blocks, self.split_bn,
            "layer")
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        self.linear = float32_classifier(self.num_classes, "linear", self.planes[-1])

    def call(self, inputs, training=None, branch="adv", return_features=False):
        x = keras.ops.relu(self.bn1(self.conv1(inputs), training=training,
                                    branch=branch))
        x, feats = run_blocks(self.blocks, self.block_names, x, "layer4.", ("bn1", "bn2"),
                              training, branch)
        pooled = self.pool(x)
        feats["pool"] = pooled
        logits = self.linear(pooled)
        if return_features:
            return logits, {k: feats[k] for k in self.tap_names}
        return logits

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, split_bn=self.split_bn)
        return config
