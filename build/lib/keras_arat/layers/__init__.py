from keras_arat.layers.split_batch_norm import BRANCHES, SplitBatchNormalization

__all__ = ["BRANCHES", "SplitBatchNormalization"]
