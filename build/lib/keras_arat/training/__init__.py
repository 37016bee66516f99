from keras_arat.training.arat import ARATModel, Predictor
from keras_arat.training.baselines import MARTModel, PGDATModel, StandardModel, TRADESModel
from keras_arat.training.optim import EpochPiecewiseConstant, TorchSGD
from keras_arat.training.trainers import AdversarialTrainer

# --method name -> trainer class; every method shares the attack, data and workdir code.
TRAINERS = {"arat": ARATModel, "pgd_at": PGDATModel, "trades": TRADESModel,
            "mart": MARTModel, "standard": StandardModel}

__all__ = ["ARATModel", "AdversarialTrainer", "EpochPiecewiseConstant", "MARTModel", "PGDATModel",
           "Predictor", "StandardModel", "TRADESModel", "TRAINERS", "TorchSGD"]
