"""Pre-activation ResNet-18 (with the final BN -> ReLU) and split BatchNorm."""

import keras

from keras_arat.models.resnet import (bn_layer, float32_classifier, input_dtype,
                                      positive_num_classes, stage_blocks, torch_conv)
from keras_arat.network import SplitBNNetwork


def preact_block(x, in_planes, planes, stride, split, name):
    """bn1 -> relu -> conv1 -> bn2 -> relu -> conv2, plus shortcut.

    The shortcut is a 1x1 conv of the first ReLU's output when the stride or the width
    changes, otherwise the block input. The layers are made in this order (bn1, conv1,
    bn2, conv2, shortcut) so that a seeded model draws the weights it always drew."""
    bn1, conv1 = bn_layer(split, f"{name}.bn1"), torch_conv(planes, 3, stride, 1,
                                                           f"{name}.conv1")
    bn2, conv2 = bn_layer(split, f"{name}.bn2"), torch_conv(planes, 3, 1, 1, f"{name}.conv2")
    shortcut = (torch_conv(planes, 1, stride, 0, f"{name}.shortcut_conv")
                if stride != 1 or in_planes != planes else None)
    r1 = keras.layers.ReLU(name=f"{name}.relu1")(bn1(x))
    short = x if shortcut is None else shortcut(r1)
    r2 = keras.layers.ReLU(name=f"{name}.relu2")(bn2(conv1(r1)))
    return keras.layers.Add(name=f"{name}.add")([conv2(r2), short])


@keras.saving.register_keras_serializable(package="keras_arat")
class PreActResNet18(SplitBNNetwork):
    """PreAct ResNet-18: 3x3 stem conv(64), PreActBlocks 2-2-2-2 at widths 64,
    128, 256, 512 (strides 1, 2, 2, 2), final BN -> ReLU -> global average pool
    -> Dense. Initialisation follows PyTorch's defaults. A functional graph.

    Features: "layer4.{0,1}.relu1", "layer4.{0,1}.relu2" and "pool". Note that
    "layer4.0.relu1" is the pre-activation of layer4's input, so it has 256
    channels at twice the spatial size; the other three have 512.
    """

    planes = (64, 128, 256, 512)
    strides = (1, 2, 2, 2)
    num_blocks = (2, 2, 2, 2)
    FEATURES = {"layer4.0.relu1": "layer4_0.relu1", "layer4.0.relu2": "layer4_0.relu2",
                "layer4.1.relu1": "layer4_1.relu1", "layer4.1.relu2": "layer4_1.relu2",
                "pool": "pool"}
    DEFAULT_TAPS = ("layer4.0.relu1", "layer4.0.relu2", "layer4.1.relu1", "layer4.1.relu2")

    def __init__(self, num_classes=10, split_bn=True, input_shape=(32, 32, 3),
                 name="preact_resnet18", **kwargs):
        num_classes = positive_num_classes(num_classes)
        image_shape = tuple(int(d) for d in input_shape)
        split = bool(split_bn)
        with keras.name_scope(name):  # weight paths "<name>/<layer>/..."
            images = keras.Input(image_shape, name="images", dtype=input_dtype())
            x = torch_conv(64, 3, 1, 1, "conv1")(images)
            in_planes = 64
            for layer, _, planes, stride in stage_blocks(self.planes, self.strides,
                                                         self.num_blocks, "layer"):
                x = preact_block(x, in_planes, planes, stride, split, layer)
                in_planes = planes
            x = keras.layers.ReLU(name="relu")(bn_layer(split, "bn")(x))
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
