"""SGD as PyTorch runs it, and the paper's epoch-wise learning rate."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_arat")
class TorchSGD(keras.optimizers.Optimizer):
    """torch.optim.SGD semantics: coupled L2 weight decay, momentum buffer on g.

        g <- g + weight_decay * w;  buf <- momentum * buf + g;  w <- w - lr * buf

    Keras' SGD folds the learning rate into the momentum buffer and its
    `weight_decay` is decoupled; both differ from the paper's optimiser once the
    learning rate changes, so this class keeps PyTorch's update exactly.
    """

    def __init__(self, learning_rate=0.1, momentum=0.9, l2_weight_decay=5e-4,
                 nesterov=False, name="torch_sgd", **kwargs):
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if l2_weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {l2_weight_decay}")
        self.momentum = momentum
        self.l2_weight_decay = l2_weight_decay
        self.nesterov = nesterov

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = [self.add_variable_from_reference(v, "momentum") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        grad = ops.cast(gradient, variable.dtype)
        if self.l2_weight_decay:
            grad = ops.add(grad, ops.multiply(self.l2_weight_decay, variable))
        buf = self.momentums[self._get_variable_index(variable)]
        self.assign(buf, ops.add(ops.multiply(self.momentum, buf), grad))
        direction = ops.add(grad, ops.multiply(self.momentum, buf)) if self.nesterov else buf
        self.assign_sub(variable, ops.multiply(lr, direction))

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, l2_weight_decay=self.l2_weight_decay,
                      nesterov=self.nesterov)
        return config


@keras.saving.register_keras_serializable(package="keras_arat")
class EpochPiecewiseConstant(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate constant within an epoch, switching after given epochs.

    boundaries are counts of completed epochs; values has one more entry. The
    paper's CIFAR schedule (epoch 1: 0.02, 2-76: 0.1, 77-91: 0.01, 92-100: 0.001)
    is boundaries=(1, 76, 91), values=(0.02, 0.1, 0.01, 0.001).
    """

    def __init__(self, steps_per_epoch, boundaries, values):
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"need len(values) == len(boundaries) + 1, got {len(values)} "
                             f"values for {len(boundaries)} boundaries")
        if list(boundaries) != sorted(boundaries):
            raise ValueError(f"lr boundaries must be increasing, got {list(boundaries)}")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.steps_per_epoch = int(steps_per_epoch)
        self.boundaries = [int(b) for b in boundaries]
        self.values = [float(v) for v in values]

    def value_at_epoch(self, epoch):
        """Learning rate of the 0-based epoch `epoch` (plain Python)."""
        return self.values[sum(epoch >= b for b in self.boundaries)]

    def __call__(self, step):
        epoch = ops.floor_divide(ops.cast(step, "int64"), self.steps_per_epoch)
        index = ops.zeros((), "int64")
        for b in self.boundaries:
            index = index + ops.cast(ops.greater_equal(epoch, b), "int64")
        return ops.take(ops.convert_to_tensor(self.values, "float32"), index)

    def get_config(self):
        return {"steps_per_epoch": self.steps_per_epoch, "boundaries": self.boundaries,
                "values": self.values}
