"""Any Keras graph as a split-BN network, behind the one contract every part relies on.

    network(x, training=None, branch="adv", return_features=False)

`branch` ("clean", "adv", or "both" for a [clean; adv] batch) picks the BN branch of
every split layer; `return_features=True` (or a tuple of names) also returns a dict of
tapped features, each a layer's output. The trainers (ARAT's invariance loss reads
features by name), the attacks, evaluation and the BN fold of export all take such a
network; the built-in families (keras_arat.models) are built this way too.

    net = keras_arat.to_split_bn(my_functional_or_sequential_model)

turns a user's model into one: the same graph with every BatchNormalization replaced by
a SplitBatchNormalization whose branches both start from the original layer's weights.
"""

import keras

from keras_arat.layers.split_batch_norm import (BOTH, BRANCHES, SplitBatchNormalization,
                                                branch_scope)

DEFAULT_INVARIANCE_WEIGHT = 30.0


@keras.saving.register_keras_serializable(package="keras_arat")
class SplitBNNetwork(keras.Model):
    """A functional graph (images -> logits) behind the network contract.

    Args:
      graph: a functional keras.Model with one input and one output (the logits).
      features: {feature name: layer name} of the features to expose by a name of their
        own (e.g. "layer4.0.bn1" for the layer "layer4_0.bn1"); any layer of the graph
        can also be tapped by its own name.
      default_taps: the features ARAT aligns when not told otherwise (default: the input
        of the classifier, i.e. the penultimate representation).
      default_invariance_weight: ARAT's gamma for this network when not told otherwise.
    """

    def __init__(self, graph, features=None, default_taps=None,
                 default_invariance_weight=DEFAULT_INVARIANCE_WEIGHT, **kwargs):
        kwargs.setdefault("name", graph.name)
        super().__init__(**kwargs)
        if not isinstance(graph, keras.Model) or not hasattr(graph, "_operations") \
                or len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise ValueError("graph must be a functional keras.Model with one input and one "
                             "output (the logits)")
        self.graph = graph
        tappable = operations_by_name(graph)
        self.features = dict(features or {})
        unknown = {k: v for k, v in self.features.items() if v not in tappable}
        if unknown:
            raise ValueError(f"features name layers the graph does not have: {unknown}")
        self.default_taps = tuple(default_taps or (penultimate_layer(graph),))
        self.default_invariance_weight = float(default_invariance_weight)
        self.tap_names = tuple(self.features) + tuple(
            name for name in tappable if name not in self.features)
        missing = [t for t in self.default_taps if t not in self.tap_names]
        if missing:
            raise ValueError(f"default_taps {missing} are neither features nor layers")
        self._feature_graphs = {}
        self.built = True

    @property
    def feature_names(self):
        """What return_features=True returns: the named features, else the default taps."""
        return tuple(self.features) or self.default_taps

    def layer_of(self, tap):
        """The graph layer (or operation) whose output is feature `tap`."""
        return operations_by_name(self.graph)[self.features.get(tap, tap)]

    def _feature_graph(self, names):
        if names not in self._feature_graphs:
            outputs = []
            for name in names:
                if name not in self.tap_names:
                    raise ValueError(f"unknown feature {name!r}; this network has "
                                     f"{list(self.tap_names)[:20]}...")
                layer = self.layer_of(name)
                if len(layer._inbound_nodes) != 1:  # noqa: SLF001 - Keras' graph
                    raise ValueError(f"layer {layer.name} is called more than once in the "
                                     "graph: its output is not one feature")
                outputs.append(layer.output)
            self._feature_graphs[names] = keras.Model(
                self.graph.inputs[0], [self.graph.outputs[0], *outputs],
                name=f"{self.graph.name}_features")
        return self._feature_graphs[names]

    def call(self, inputs, training=None, branch="adv", return_features=False):
        if branch not in BRANCHES + (BOTH,):
            raise ValueError(f"branch must be one of {BRANCHES + (BOTH,)}, got {branch!r}")
        with branch_scope(branch):
            if not return_features:
                return self.graph(inputs, training=training)
            names = self.feature_names if return_features is True else tuple(return_features)
            logits, *feats = self._feature_graph(names)(inputs, training=training)
        return logits, dict(zip(names, feats))

    def compute_output_shape(self, input_shape):
        return self.graph.compute_output_shape(input_shape)

    def get_config(self):
        return {"name": self.name, "graph": keras.saving.serialize_keras_object(self.graph),
                "features": self.features, "default_taps": list(self.default_taps),
                "default_invariance_weight": self.default_invariance_weight}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["graph"] = keras.saving.deserialize_keras_object(config["graph"])
        return cls(**config)


def operations_by_name(graph):
    """{name: layer or operation} of a functional graph, its input aside: layers and
    operations on KerasTensors (x * 0.5, keras.ops.mean) alike can be tapped."""
    return {op.name: op for op in graph.operations
            if not isinstance(op, keras.layers.InputLayer)}


def penultimate_layer(graph):
    """Name of the layer whose output feeds the graph's output layer (the representation
    a classifier head reads), e.g. the pooled features before the last Dense."""
    history = graph.outputs[0]._keras_history  # noqa: SLF001 - Keras' graph
    head = history.operation
    node = head._inbound_nodes[history.node_index]  # noqa: SLF001
    if len(node.input_tensors) != 1:
        raise ValueError(f"the output layer {head.name} has {len(node.input_tensors)} inputs: "
                         "name the features to align (taps=...)")
    producer = node.input_tensors[0]._keras_history.operation  # noqa: SLF001
    if isinstance(producer, keras.layers.InputLayer):
        raise ValueError("the graph is a single layer: there is no representation to align")
    return producer.name


def as_functional(model):
    """A functional view (the same layers) of a functional or Sequential model."""
    if isinstance(model, SplitBNNetwork):
        return model.graph
    if isinstance(model, keras.Sequential):
        try:
            return keras.Model(model.inputs, model.outputs, name=model.name)
        except (AttributeError, ValueError) as e:
            raise ValueError(f"Sequential model {model.name} has no defined input: give it a "
                             f"keras.Input(shape) first ({e})") from None
    if isinstance(model, keras.Model) and hasattr(model, "_operations"):
        return model
    raise ValueError(f"{model.name} is a subclassed {type(model).__name__}: only functional and "
                     "Sequential models show Keras their graph (rebuild it with the "
                     "functional API, or write a SplitBNNetwork-compatible model)")


def _check_rewritable(graph):
    """Refuse a layer whose BatchNormalization the graph cannot reach (a subclassed layer
    with BN inside): one error naming it."""
    for layer in graph.layers:
        if isinstance(layer, (keras.layers.BatchNormalization, SplitBatchNormalization)):
            continue
        if isinstance(layer, keras.Model) and hasattr(layer, "_operations"):
            _check_rewritable(as_functional(layer))
            continue
        inner = [sub for sub in layer._flatten_layers(include_self=False, recursive=True)  # noqa: SLF001
                 if isinstance(sub, keras.layers.BatchNormalization)]
        if inner:
            raise ValueError(
                f"cannot rewrite layer '{layer.name}' ({type(layer).__name__}): it holds "
                f"BatchNormalization '{inner[0].name}' inside its own call, which the graph "
                "does not show; build that block with the functional API")


def to_split_bn(model, split=True, momentum=None, taps=None, features=None,
                default_invariance_weight=DEFAULT_INVARIANCE_WEIGHT, name=None, **bn_settings):
    """The same graph with every BatchNormalization replaced by SplitBatchNormalization.

    Both branches of each split layer start from the original layer's weights and moving
    statistics, and keep every one of its settings (momentum, epsilon, center, scale,
    initializers, regularizers, constraints, renorm, trainable, dtype policy); every other
    layer and operation (`h * 0.5 + 1`, keras.ops calls) is a copy with the original's
    weights, and the original model is left unchanged. Works for functional and Sequential
    models, nested ones included.

    Args:
      momentum, **bn_settings: override a BatchNormalization setting in every split layer,
        e.g. momentum=0.9 (PyTorch's default and the paper's: Keras' 0.99 leaves the moving
        statistics unusable after short runs), epsilon=1e-5, gamma_regularizer=...;
        None keeps each layer's own. synchronized: a layer's True stays; Keras' default
        False becomes None, which reduces the batch statistics across replicas whenever a
        tf.distribute strategy runs several (N devices train as one); pass
        synchronized=False for per-replica statistics.
      taps / features / default_invariance_weight: see SplitBNNetwork (taps are its
        default_taps; default: the classifier's input).
      split: False gives one shared BN per site (single-BN baselines and ablations).
    A graph without any BatchNormalization is returned as a SplitBNNetwork all the same
    (there is nothing to split: clean and adv are the same network), with a one-line
    note on stderr.
    Raises ValueError naming a layer it cannot rewrite (e.g. a subclassed block with a
    BatchNormalization inside).
    """
    graph = as_functional(model)
    _check_rewritable(graph)
    overrides = {"momentum": momentum, **bn_settings}
    pairs = []

    def clone(layer):
        if isinstance(layer, SplitBatchNormalization):
            new = layer.__class__.from_config(layer.get_config())
        elif isinstance(layer, keras.layers.BatchNormalization):
            new = SplitBatchNormalization.from_batch_norm(layer, split=split, **overrides)
        else:
            try:
                new = layer.__class__.from_config(layer.get_config())
            except Exception as e:  # noqa: BLE001 - a custom layer's own config code
                raise ValueError(f"cannot copy layer '{layer.name}' ({type(layer).__name__}): "
                                 f"its get_config/from_config fails ({e})") from None
        pairs.append((layer, new))
        return new

    name = name or model.name
    with keras.name_scope(name):  # weight paths "<name>/<layer>/...", as the built-ins'
        cloned = keras.models.clone_model(graph, clone_function=clone, recursive=True)
    for old, new in pairs:
        if isinstance(old, keras.layers.BatchNormalization) and \
                isinstance(new, SplitBatchNormalization):
            new.copy_from(old)
        elif getattr(old, "weights", None):  # operations (x * 0.5) hold none
            new.set_weights(old.get_weights())
    if not any(isinstance(new, SplitBatchNormalization) for _, new in pairs):
        import sys
        print(f"note: {graph.name} has no BatchNormalization: nothing to split, its clean and "
              "adv branches are the same network", file=sys.stderr)
    cloned = keras.Model(cloned.inputs[0], cloned.outputs[0], name=name)
    return SplitBNNetwork(cloned, features=features, default_taps=taps,
                          default_invariance_weight=default_invariance_weight, name=name)
