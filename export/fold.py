"""Fold one BatchNorm branch of a split-BN network into a plain functional Keras model.

Inference-mode BN is an affine map per channel, y = x * s + t with
s = gamma / sqrt(var + eps) and t = beta - mean * s. Where a convolution feeds the BN
and nothing else reads the raw convolution output, the map is merged into that
convolution (kernel * s, bias * s + t; the folded convolution gets a bias). Where no
convolution precedes the BN (the pre-activation blocks of WRN / PreAct ResNet, whose
BN reads a residual sum or a tensor also used as a shortcut), the map becomes a 1x1
DepthwiseConv2D with a bias: plain Keras, converted by tf2onnx to a grouped Conv, never
to BatchNormalization.

The folded model uses only built-in Keras layers (Conv2D, ZeroPadding2D,
DepthwiseConv2D, Dense, ReLU, Add, Flatten, GlobalAveragePooling2D), so
`model.keras` loads without keras_arat. Every weight of the network except the other
branch's BN statistics must be consumed, which `fold_network` checks.
"""

import keras
import numpy as np

from keras_arat.layers.split_batch_norm import BRANCHES, SplitBatchNormalization
from keras_arat.models import PreActResNet18, ResNet18, SmallCNN, WideResNet

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


class FoldError(ValueError):
    """The network cannot be folded (unknown family, unexpected layer settings)."""


def bn_affine(bn):
    """(scale, shift) as float64 arrays for a built keras BatchNormalization."""
    if not bn.built:
        raise FoldError(f"BatchNormalization {bn.name} is not built")
    channels = bn.moving_mean.shape[-1]
    gamma = np.asarray(bn.gamma.numpy(), np.float64) if bn.scale else np.ones(channels)
    beta = np.asarray(bn.beta.numpy(), np.float64) if bn.center else np.zeros(channels)
    mean = np.asarray(bn.moving_mean.numpy(), np.float64)
    var = np.asarray(bn.moving_variance.numpy(), np.float64)
    scale = gamma / np.sqrt(var + float(bn.epsilon))
    return scale, beta - mean * scale


class _Folder:
    """Builds the folded graph layer by layer and records every variable it reads."""

    def __init__(self, branch):
        self.branch = branch
        self.used = set()
        self.counter = 0

    def _name(self, base):
        self.counter += 1
        return f"{base}_{self.counter}"

    def _use(self, *variables):
        for v in variables:
            if v is not None:
                self.used.add(id(v))

    def _bn(self, split_bn):
        if not isinstance(split_bn, SplitBatchNormalization):
            raise FoldError(f"expected SplitBatchNormalization, got {type(split_bn).__name__}")
        if split_bn.axis not in (-1, 3):
            raise FoldError(f"{split_bn.name}: only channels-last BN (axis -1) is supported")
        bn = split_bn.branch_layer(self.branch)
        self._use(*bn.weights)
        return bn_affine(bn)

    def conv(self, conv, x, split_bn=None):
        """conv (and, if given, the BN right after it, folded in) applied to x."""
        if conv.data_format != "channels_last":
            raise FoldError(f"{conv.name}: only channels_last convolutions are supported")
        if keras.activations.serialize(conv.activation) != "linear":
            raise FoldError(f"{conv.name}: a BN can only be folded into a linear conv")
        if getattr(conv, "groups", 1) != 1:
            raise FoldError(f"{conv.name}: grouped convolutions are not supported")
        kernel = np.asarray(conv.kernel.numpy(), np.float64)
        bias = np.asarray(conv.bias.numpy(), np.float64) if conv.use_bias else None
        self._use(conv.kernel, conv.bias if conv.use_bias else None)
        if split_bn is not None:
            scale, shift = self._bn(split_bn)
            kernel = kernel * scale  # HWIO: scales the output channels
            bias = shift if bias is None else bias * scale + shift
        pad = int(getattr(conv, "_explicit_pad", 0) or 0)
        base = conv.name if split_bn is None else f"{conv.name}_{split_bn.name}"
        if pad:
            x = keras.layers.ZeroPadding2D(pad, name=self._name(f"{conv.name}_pad"))(x)
        layer = keras.layers.Conv2D(
            conv.filters, conv.kernel_size, strides=conv.strides,
            padding="valid" if pad else conv.padding, dilation_rate=conv.dilation_rate,
            use_bias=bias is not None, name=self._name(base))
        y = layer(x)
        layer.set_weights([kernel.astype(np.float32)]
                          + ([] if bias is None else [bias.astype(np.float32)]))
        return y

    def affine(self, split_bn, x):
        """A BN with no convolution before it, as a 1x1 depthwise conv with a bias."""
        scale, shift = self._bn(split_bn)
        layer = keras.layers.DepthwiseConv2D(1, use_bias=True,
                                             name=self._name(f"{split_bn.name}_affine"))
        y = layer(x)
        layer.set_weights([scale.reshape(1, 1, -1, 1).astype(np.float32),
                           shift.astype(np.float32)])
        return y

    def dense(self, dense, x, name=None):
        self._use(dense.kernel, dense.bias if dense.use_bias else None)
        layer = keras.layers.Dense(dense.units, activation=dense.activation,
                                   use_bias=dense.use_bias,
                                   name=name or self._name(dense.name))
        y = layer(x)
        layer.set_weights([w.numpy() for w in dense.weights])
        return y

    def relu(self, x):
        return keras.layers.ReLU(name=self._name("relu"))(x)

    def add(self, a, b):
        return keras.layers.Add(name=self._name("add"))([a, b])


def _small_cnn(f, net, x):
    for conv, bn in zip(net.convs, net.bns):
        x = f.relu(f.conv(conv, x, bn))
    x = keras.layers.Flatten(name="flatten")(x)
    x = f.relu(f.dense(net.hidden, x))
    return f.dense(net.classifier, x, name=OUTPUT_NAME)


def _resnet18(f, net, x):
    x = f.relu(f.conv(net.conv1, x, net.bn1))
    for block in net.blocks:
        h = f.relu(f.conv(block.conv1, x, block.bn1))
        h = f.conv(block.conv2, h, block.bn2)
        short = f.conv(block.shortcut_conv, x, block.shortcut_bn) if block.has_shortcut else x
        x = f.relu(f.add(h, short))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return f.dense(net.linear, x, name=OUTPUT_NAME)


def _wrn(f, net, x):
    x = f.conv(net.conv1, x)
    for block in net.blocks:
        r1 = f.relu(f.affine(block.bn1, x))
        r2 = f.relu(f.conv(block.conv1, r1, block.bn2))
        out = f.conv(block.conv2, r2)
        short = x if block.equal_in_out else f.conv(block.shortcut_conv, r1)
        x = f.add(out, short)
    x = f.relu(f.affine(net.bn, x))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return f.dense(net.fc, x, name=OUTPUT_NAME)


def _preact_resnet18(f, net, x):
    x = f.conv(net.conv1, x)
    for block in net.blocks:
        r1 = f.relu(f.affine(block.bn1, x))
        short = f.conv(block.shortcut_conv, r1) if block.has_shortcut else x
        r2 = f.relu(f.conv(block.conv1, r1, block.bn2))
        x = f.add(f.conv(block.conv2, r2), short)
    x = f.relu(f.affine(net.bn, x))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return f.dense(net.linear, x, name=OUTPUT_NAME)


# Checked in order; a subclass of a family folds like its family.
FAMILIES = ((SmallCNN, _small_cnn), (ResNet18, _resnet18), (WideResNet, _wrn),
            (PreActResNet18, _preact_resnet18))


def _other_branch_weights(network, branch):
    skipped = set()
    for layer in network._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, SplitBatchNormalization) and layer.split:
            for name, bn in layer.bns.items():
                if name != branch:
                    skipped.update(id(v) for v in bn.weights)
    return skipped


def fold_network(network, branch="adv", input_shape=None):
    """A functional keras.Model computing `network(x, training=False, branch=branch)`.

    Input "images" [N, H, W, C] float32, output "logits" [N, K]. `input_shape` (H, W, C)
    defaults to the shape the network was built with.
    """
    if branch not in BRANCHES:
        raise FoldError(f"unknown branch {branch!r}; choose from {list(BRANCHES)}")
    builder = next((fn for cls, fn in FAMILIES if isinstance(network, cls)), None)
    if builder is None:
        raise FoldError(f"cannot fold a {type(network).__name__}; supported: "
                        + ", ".join(cls.__name__ for cls, _ in FAMILIES))
    if not network.built:
        raise FoldError("the network is not built (call it once on an input first)")
    if input_shape is None:
        input_shape = network_input_shape(network)
    f = _Folder(branch)
    images = keras.Input(shape=tuple(input_shape), dtype="float32", name=INPUT_NAME)
    logits = builder(f, network, images)
    expected = {id(v) for v in network.weights} - _other_branch_weights(network, branch)
    missing = [v.path for v in network.weights if id(v) in expected - f.used]
    if missing or f.used - expected:
        raise FoldError(f"folding left {len(missing)} weight(s) unused (e.g. "
                        f"{missing[:3]}) or read foreign ones; the family's layout changed?")
    return keras.Model(images, logits, name=f"{network.name}_folded_{branch}")


def network_input_shape(network):
    """(H, W, C) the network was built with."""
    shape = None
    build_config = network.get_build_config() if hasattr(network, "get_build_config") else None
    if build_config and "input_shape" in build_config:
        shape = build_config["input_shape"]
    if shape is None or len(shape) != 4 or any(d is None for d in shape[1:]):
        raise FoldError("cannot tell the network's input shape; pass input_shape=(H, W, C)")
    return tuple(int(d) for d in shape[1:])


def count_layers(model, cls):
    """Number of layers of type `cls` anywhere in `model`."""
    return sum(isinstance(l, cls) for l in model._flatten_layers(include_self=True,
                                                                 recursive=True))
