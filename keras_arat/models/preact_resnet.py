"""Pre-activation ResNet-18 (with the final BN -> ReLU) and split BatchNorm."""

import keras

from keras_arat.layers.split_batch_norm import SplitBatchNormalization
from keras_arat.models.resnet import (ResidualBlock, build_stages, float32_classifier,
                                      positive_num_classes, run_blocks, torch_conv)


@keras.saving.register_keras_serializable(package="keras_arat")
class PreActBlock(ResidualBlock):
    """bn1 -> relu -> conv1 -> bn2 -> relu -> conv2, plus shortcut.

    The shortcut is a 1x1 conv of the first ReLU's output when the stride or the
    width changes, otherwise the block input. Features: "relu1", "relu2".
    """

    def __init__(self, in_planes, planes, stride=1, split_bn=True, **kwargs):
        super().__init__(in_planes, planes, stride, split_bn, **kwargs)
        self.bn1 = SplitBatchNormalization(split=self.split_bn, name="bn1")
        self.conv1 = torch_conv(self.planes, 3, self.stride, 1, "conv1")
        self.bn2 = SplitBatchNormalization(split=self.split_bn, name="bn2")
        self.conv2 = torch_conv(self.planes, 3, 1, 1, "conv2")
        self.has_shortcut = self.stride != 1 or self.in_planes != self.planes
        if self.has_shortcut:
            self.shortcut_conv = torch_conv(self.planes, 1, self.stride, 0,
                                            "shortcut_conv")

    def call(self, inputs, training=None, branch="adv", return_features=False):
        r1 = keras.ops.relu(self.bn1(inputs, training=training, branch=branch))
        short = self.shortcut_conv(r1) if self.has_shortcut else inputs
        r2 = keras.ops.relu(self.bn2(self.conv1(r1), training=training,
                                     branch=branch))
        out = self.conv2(r2) + short
        if return_features:
            return out, {"relu1": r1, "relu2": r2}
        return out


@keras.saving.register_keras_serializable(package="keras_arat")
class PreActResNet18(keras.Model):
    """PreAct ResNet-18: 3x3 stem conv(64), PreActBlocks 2-2-2-2 at widths 64,
    128, 256, 512 (strides 1, 2, 2, 2), final BN -> ReLU -> global average pool
    -> Dense. Initialisation follows PyTorch's defaults.

    Features: "layer4.{0,1}.relu1", "layer4.{0,1}.relu2" and "pool". Note that
    "layer4.0.relu1" is the pre-activation of layer4's input, so it has 256
    channels at twice the spatial size; the other three have 512.
    """

    tap_names = ("layer4.0.relu1", "layer4.0.relu2", "layer4.1.relu1",
                 "layer4.1.relu2", "pool")
    default_taps = ("layer4.0.relu1", "layer4.0.relu2", "layer4.1.relu1",
                    "layer4.1.relu2")
    default_invariance_weight = 30.0

    planes = (64, 128, 256, 512)
    strides = (1, 2, 2, 2)
    num_blocks = (2, 2, 2, 2)

    def __init__(self, num_classes=10, split_bn=True, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = positive_num_classes(num_classes)
        self.split_bn = bool(split_bn)
        self.conv1 = torch_conv(64, 3, 1, 1, "conv1")
        self.blocks, self.block_names = build_stages(
            PreActBlock, 64, self.planes, self.strides, self.num_blocks, self.split_bn,
            "layer")
        self.bn = SplitBatchNormalization(split=self.split_bn, name="bn")
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        self.linear = float32_classifier(self.num_classes, "linear", self.planes[-1])

    def call(self, inputs, training=None, branch="adv", return_features=False):
        x, feats = run_blocks(self.blocks, self.block_names, self.conv1(inputs), "layer4.",
                              ("relu1", "relu2"), training, branch)
        x = keras.ops.relu(self.bn(x, training=training, branch=branch))
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
