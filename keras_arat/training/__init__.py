from keras_arat.training.optim import EpochPiecewiseConstant, TorchSGD
from keras_arat.training.trainers import (TRAINERS, AdversarialTrainer, ARATModel,
                                          PGDATModel, StandardModel)

__all__ = ["ARATModel", "AdversarialTrainer", "EpochPiecewiseConstant", "PGDATModel",
           "StandardModel", "TRAINERS", "TorchSGD"]
