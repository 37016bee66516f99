"""Fold one BatchNorm branch of any functional Keras graph into a plain inference model.

Inference-mode BN is an affine map per channel, y = x * s + t with
s = gamma / sqrt(var + eps) and t = beta - mean * s. The graph is walked once
(keras.models.clone_model with a call function), and for every BatchNormalization or
SplitBatchNormalization (its chosen branch):
- if a Conv2D, DepthwiseConv2D or Dense with a linear activation feeds it and nothing
  else reads that layer's output, the map is merged into that layer (kernel * s,
  bias * s + t; the folded layer gets a bias) and the BN disappears;
- otherwise (pre-activation blocks, whose BN reads a residual sum or a tensor also used
  as a shortcut) it becomes a per-channel scale-and-shift: a 1x1 DepthwiseConv2D with a
  bias, which tf2onnx converts to a grouped Conv, never to BatchNormalization.
Every other layer is copied with its weights. keras_arat's padded TorchConv2D becomes a
ZeroPadding2D and a Conv2D, so the folded built-in families use only Keras' own layers
and `model.keras` loads without keras_arat. Nothing here knows a model's topology: the
graph is what Keras records.
"""

import keras
import numpy as np

from keras_arat.errors import UsageError
from keras_arat.layers.split_batch_norm import BRANCHES, SplitBatchNormalization
from keras_arat.network import as_functional

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
FOLDABLE = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
BN_TYPES = (keras.layers.BatchNormalization, SplitBatchNormalization)


class FoldError(UsageError):
    """The network cannot be folded (a layer setting the fold cannot express)."""


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


def _branch_bn(layer, branch):
    """The keras BatchNormalization a BN-type layer applies on `branch`."""
    bn = layer.branch_layer(branch) if isinstance(layer, SplitBatchNormalization) else layer
    rank = bn.input_spec.ndim if bn.built and bn.input_spec is not None else None
    if bn.axis != -1 and (rank is None or bn.axis != rank - 1):
        raise FoldError(f"{layer.name}: only BatchNormalization over the last (channels) axis "
                        f"can be folded, this one normalises axis {bn.axis}")
    return bn


def _all_layers(graph):
    """Every layer of a functional graph, nested functional/Sequential models opened."""
    for layer in graph.layers:
        if isinstance(layer, keras.Model) and hasattr(layer, "_operations"):
            yield from _all_layers(as_functional(layer))
        yield layer


def _single_consumer(producer, node):
    """True if `node` is the only place the producer's output is read."""
    outbound = producer._outbound_nodes  # noqa: SLF001 - Keras' graph
    return len(producer._inbound_nodes) == 1 and len(outbound) == 1 and outbound[0] is node  # noqa: SLF001


def _foldable_into(layer, graph_outputs):
    """The layer a BN-type `layer` can be merged into, or None."""
    if len(layer._inbound_nodes) != 1:  # noqa: SLF001 - a shared BN: keep it as a map
        return None
    node = layer._inbound_nodes[0]  # noqa: SLF001
    if len(node.input_tensors) != 1:
        return None
    producer = node.input_tensors[0]._keras_history.operation  # noqa: SLF001
    if not isinstance(producer, FOLDABLE) or not _single_consumer(producer, node):
        return None
    if keras.activations.serialize(producer.activation) != "linear":
        return None
    if getattr(producer, "data_format", "channels_last") != "channels_last" \
            or getattr(producer, "groups", 1) != 1:
        return None
    if any(t._keras_history.operation is producer for t in graph_outputs):  # noqa: SLF001
        return None
    return producer


def _plain_config(layer, folded):
    """Config of the built-in Keras layer standing in for `layer` in the folded graph."""
    config = layer.get_config()
    if folded:
        config["use_bias"] = True
    pad = int(getattr(layer, "_explicit_pad", 0) or 0)
    if "torch_padding" in config:  # keras_arat's TorchConv2D: explicit padding, then "valid"
        config.pop("torch_padding")
        config["padding"] = "valid" if pad else layer.padding
    return config, pad


def fold_network(network, branch="adv", input_shape=None):
    """A functional keras.Model computing `network(x, training=False, branch=branch)`.

    `network` is a SplitBNNetwork (a built-in family or a converted user model) or any
    functional or Sequential Keras model. Input [N, H, W, C] float32, output the logits.
    `input_shape` (H, W, C) defaults to the graph's. Raises FoldError if a BN remains or
    a weight of the chosen branch goes unused.
    """
    _check_branch(branch)
    graph = _functional_graph(network)
    input_shape = tuple(input_shape or network_input_shape(graph))
    if not any(isinstance(layer, BN_TYPES) for layer in _all_layers(graph)):
        return _copy_without_bn(graph, input_shape, branch)
    into, merged = _plan_merges(graph, branch)
    folder = _GraphFolder(branch, into, merged)
    folded = _rebuild(graph, input_shape, folder)
    folder.set_nested_weights()
    _check_no_bn_left(folded)
    _check_weights_used(graph, branch, folder.used)
    return keras.Model(folded.inputs[0], folded.outputs[0], name=f"{graph.name}_folded_{branch}")


def _check_branch(branch):
    if branch not in BRANCHES:
        raise FoldError(f"unknown branch {branch!r}; choose from {list(BRANCHES)}")


def _functional_graph(network):
    """The functional graph of `network`, or FoldError if it has none."""
    try:
        return as_functional(network)
    except ValueError as e:
        raise FoldError(f"cannot fold: {e}") from None


def _plan_merges(graph, branch):
    """Which BN merges into which layer: (into, merged), id(BN layer) -> producer and
    id(producer) -> BN layer. Every BN-type layer's branch is checked on the way."""
    into, merged = {}, {}
    for layer in _all_layers(graph):
        if isinstance(layer, BN_TYPES):
            _branch_bn(layer, branch)
            producer = _foldable_into(layer, graph.outputs)
            if producer is not None:
                into[id(layer)], merged[id(producer)] = producer, layer
    return into, merged


def _rebuild(graph, input_shape, folder):
    """keras.models.clone_model of `graph` on an input named INPUT_NAME, with the
    folder's clone and call functions; FoldError if Keras cannot rebuild it."""
    images = keras.Input(shape=input_shape, dtype="float32", name=INPUT_NAME)
    try:
        # A graph rebuilt from a loaded Sequential holds its input as a one-tensor list.
        inputs = [images] if isinstance(graph.input, (list, tuple)) else images
        return keras.models.clone_model(graph, input_tensors=inputs,
                                        clone_function=folder.clone,
                                        call_function=folder.call, recursive=True)
    except FoldError:
        raise
    except Exception as e:  # noqa: BLE001 - anything Keras cannot rebuild
        raise FoldError(f"cannot rebuild the graph of {graph.name}: "
                        f"{str(e).splitlines()[0][:200]}") from None


def _check_no_bn_left(folded):
    left = [layer.name for layer in folded._flatten_layers(recursive=True)  # noqa: SLF001
            if isinstance(layer, BN_TYPES)]
    if left:
        raise FoldError(f"BatchNormalization left in the folded graph: {left[:3]} (inside a "
                        "nested Sequential model?)")


def _check_weights_used(graph, branch, used):
    """FoldError unless exactly the graph's weights outside the other branch were read."""
    expected = {id(v) for v in graph.weights} - _other_branch_weights(graph, branch)
    missing = [v.path for v in graph.weights if id(v) in expected - used]
    if missing or used - expected:
        raise FoldError(f"folding left {len(missing)} weight(s) unused (e.g. {missing[:3]}) "
                        "or read foreign ones")


def _merged_kernel_and_bias(layer, values, scale, shift):
    """[kernel, bias] of a Conv2D, DepthwiseConv2D or Dense with y * scale + shift merged
    into its output; `values` its float64 weights."""
    kernel = values[0]
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # (kh, kw, in, multiplier)
        kernel = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
    else:  # Conv2D (kh, kw, in, out), Dense (in, out): the output axis is last
        kernel = kernel * scale
    bias = shift if not layer.use_bias else values[1] * scale + shift
    return [kernel, bias]


def _scale_and_shift(x, scale, shift, name, bn_name):
    """x * scale + shift per channel as a 1x1 DepthwiseConv2D with a bias named `name`;
    a rank-2 x goes through a 1x1 image, so that only built-in layers are used."""
    rank = len(x.shape)
    if rank == 2:  # (N, C)
        x = keras.layers.Reshape((1, 1, x.shape[-1]), name=f"{name}_to_image")(x)
    elif rank != 4:
        raise FoldError(f"{bn_name}: a BatchNormalization of a rank-{rank} tensor with "
                        "no Conv/Dense before it cannot be folded")
    depthwise = keras.layers.DepthwiseConv2D(1, use_bias=True, name=name)
    y = depthwise(x)
    depthwise.set_weights([scale.reshape(1, 1, -1, 1).astype(np.float32),
                           shift.astype(np.float32)])
    if rank == 2:
        y = keras.layers.Reshape((y.shape[-1],), name=f"{name}_to_vector")(y)
    return y


class _GraphFolder:
    """One fold in progress: `clone` and `call` are clone_model's clone_function and
    call_function. A BN merged into its producer becomes the identity (the producer's copy
    gets the merged weights), any other BN a scale-and-shift; every other layer is copied
    with its weights, a padded TorchConv2D as a ZeroPadding2D and a Conv2D."""

    def __init__(self, branch, into, merged):
        self.branch = branch
        self.into, self.merged = into, merged  # from _plan_merges
        self.used = set()  # ids of the original weights read
        self.counter = 0  # numbers the layers the fold adds (scale-and-shifts, paddings)
        self.originals = {}  # id(copy) -> original layer
        self.copies = []  # (copy, original)
        self.done = set()  # ids of the copies whose weights are set

    def clone(self, layer):
        if isinstance(layer, BN_TYPES):
            return layer  # never called: call() maps or merges it
        if not isinstance(layer, keras.layers.Layer):  # an operation: no weights, no config
            return layer
        config, _ = _plain_config(layer, id(layer) in self.merged)
        cls = keras.layers.Conv2D if "torch_padding" in layer.get_config() else layer.__class__
        try:
            new = cls.from_config(config)
        except Exception as e:  # noqa: BLE001 - a custom layer's own config code
            raise FoldError(f"cannot copy layer '{layer.name}' ({type(layer).__name__}): "
                            f"{e}") from None
        self.originals[id(new)] = layer
        self.copies.append((new, layer))
        return new

    def call(self, new, *args, **kwargs):
        if isinstance(new, BN_TYPES):
            return args[0] if id(new) in self.into else self.affine(new, args[0])
        old = self.originals.get(id(new), new)  # an operation (x * 0.5) Keras did not clone
        if not isinstance(old, keras.layers.Layer):
            return new(*args, **kwargs)
        _, pad = _plain_config(old, False)
        if pad:
            self.counter += 1
            args = (keras.layers.ZeroPadding2D(pad, name=f"{old.name}_pad_{self.counter}")(
                args[0]),) + args[1:]
        kwargs.pop("training", None)
        kwargs.pop("mask", None)
        out = new(*args, **kwargs)
        if old.weights:
            self.set_weights(new, old)
        return out

    def set_weights(self, new, old):
        """The copy `new` gets `old`'s weights, with the BN merged into `old` if any."""
        self.done.add(id(new))
        values = [np.asarray(w.numpy(), np.float64) for w in old.weights]
        self.used.update(id(w) for w in old.weights)
        if id(old) in self.merged:
            bn = _branch_bn(self.merged[id(old)], self.branch)
            self.used.update(id(w) for w in bn.weights)
            values = _merged_kernel_and_bias(old, values, *bn_affine(bn))
        new.set_weights([v.astype(np.float32) for v in values])

    def affine(self, layer, x):
        """The BN-type `layer` on `x` as a per-channel scale-and-shift."""
        bn = _branch_bn(layer, self.branch)
        self.used.update(id(w) for w in bn.weights)
        scale, shift = bn_affine(bn)
        self.counter += 1
        return _scale_and_shift(x, scale, shift, f"{layer.name}_affine_{self.counter}",
                                layer.name)

    def set_nested_weights(self):
        """Inside a nested Sequential, Keras calls no call_function: weights set here."""
        for new, old in self.copies:
            if id(new) not in self.done and old.weights and new.built:
                self.set_weights(new, old)


def fold_bn(network, branch="adv", input_shape=None):
    """A plain functional Keras model computing network(x, training=False, branch=branch)
    with every BatchNormalization folded into the layer before it (or into a per-channel
    scale-and-shift where no Conv/Dense precedes it). Works for a SplitBNNetwork and for
    any functional or Sequential model (keras_arat.fold_bn)."""
    return fold_network(network, branch, input_shape)


def _copy_without_bn(graph, input_shape, branch):
    """A graph with no BatchNormalization has nothing to fold: a copy of it (weights and
    all) on an input named INPUT_NAME, with a one-line note."""
    import sys
    print(f"note: {graph.name} has no BatchNormalization: nothing to fold, exported as it "
          "is", file=sys.stderr)
    images = keras.Input(shape=input_shape, dtype="float32", name=INPUT_NAME)
    copy = keras.models.clone_model(graph, input_tensors=images)
    copy.set_weights(graph.get_weights())
    return keras.Model(copy.inputs[0], copy.outputs[0], name=f"{graph.name}_folded_{branch}")


def _other_branch_weights(graph, branch):
    skipped = set()
    for layer in _all_layers(graph):
        if isinstance(layer, SplitBatchNormalization) and layer.split:
            for name, bn in layer.bns.items():
                if name != branch:
                    skipped.update(id(v) for v in bn.weights)
    return skipped


def network_input_shape(network):
    """(H, W, C) of the network's input."""
    try:
        shape = as_functional(network).inputs[0].shape
    except (ValueError, AttributeError, IndexError):
        shape = None
    if shape is None or len(shape) != 4 or any(d is None for d in shape[1:]):
        raise FoldError("cannot tell the network's input shape; pass input_shape=(H, W, C)")
    return tuple(int(d) for d in shape[1:])


def count_layers(model, cls):
    """Number of layers of type `cls` anywhere in `model`."""
    return sum(isinstance(layer, cls)
               for layer in model._flatten_layers(include_self=True, recursive=True))  # noqa: SLF001
