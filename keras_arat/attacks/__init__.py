from keras_arat.attacks import core
from keras_arat.attacks.pgd import PGD

__all__ = ["PGD", "core"]
