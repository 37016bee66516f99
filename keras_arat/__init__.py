"""keras_arat: adversarially robust image classifiers in Keras with ARAT."""

__version__ = "0.1.0"
