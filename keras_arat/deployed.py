"""Running a deployed model: one SavedModel runner and one ONNX runner, used by
keras_arat.evaluate (attacks need the SavedModel's gradients) and by export's parity
checks. Both take float32 NHWC images in [0, 1] and return logits [N, K].

A SavedModel may have any single-input serving signature (export writes "images" ->
"logits"; a Keras `model.export()` folder names its input after the model's input layer):
the input is found by itself, or named with input_name. The output is "logits" when the
signature has it, else its only output.
"""

import numpy as np

from keras_arat.errors import UsageError

SIGNATURE = "serving_default"
LOGITS = "logits"


class SavedModelRunner:
    """images -> logits through a SavedModel's serving signature, with gradients.

    Called on a tf.Tensor it returns a tf.Tensor (usable inside tf.function and under a
    GradientTape: the attacks run on it); `predict(numpy)` returns numpy.
    """

    def __init__(self, path, input_name=None, signature=SIGNATURE):
        import tensorflow as tf
        try:
            self.loaded = tf.saved_model.load(path)
        except Exception as e:  # noqa: BLE001 - a damaged or foreign folder
            raise UsageError(f"cannot load SavedModel {path}: "
                             f"{str(e).strip().splitlines()[0][:200]}") from None
        if signature not in self.loaded.signatures:
            raise UsageError(f"{path} has no {signature} signature (it has "
                             f"{sorted(self.loaded.signatures) or 'none'})")
        self.signature = self.loaded.signatures[signature]
        inputs = self.signature.structured_input_signature[1]
        if input_name is None:
            if len(inputs) != 1:
                raise UsageError(f"{path}: the {signature} signature takes {len(inputs)} inputs "
                                 f"{sorted(inputs)}; pass --input_name to choose the images")
            input_name = next(iter(inputs))
        elif input_name not in inputs:
            raise UsageError(f"{path}: the {signature} signature has no input {input_name!r} "
                             f"(it takes {sorted(inputs)})")
        self.input_name = input_name
        spec = inputs[input_name]
        self.input_shape = tuple(spec.shape[1:]) if spec.shape.rank else None
        outputs = self.signature.structured_outputs
        if LOGITS in outputs:
            self.output_name = LOGITS
        elif len(outputs) == 1:
            self.output_name = next(iter(outputs))
        else:
            raise UsageError(f"{path}: the {signature} signature returns {sorted(outputs)}; "
                             f"one of them must be named '{LOGITS}'")
        self.path = path

    def __call__(self, images):
        import tensorflow as tf
        out = self.signature(**{self.input_name: tf.cast(images, tf.float32)})
        return out[self.output_name]

    def predict(self, images):
        return np.asarray(self(np.asarray(images, np.float32)))


class OnnxRunner:
    """images -> logits with onnxruntime (CPU unless other providers are given). No
    gradients: `as_tf()` wraps it for gradient-free attacks (Square) in tf.function.
    `path` is a file or the serialized model (bytes)."""

    def __init__(self, path, providers=("CPUExecutionProvider",), input_name=None):
        import onnxruntime as ort
        if isinstance(path, bytes):
            path, model = "the converted model", path
        else:
            model = path
        try:
            self.session = ort.InferenceSession(model, providers=list(providers))
        except Exception as e:  # noqa: BLE001 - onnxruntime's own errors
            raise UsageError(f"cannot load ONNX model {path}: "
                             f"{str(e).strip().splitlines()[0][:200]}") from None
        names = [i.name for i in self.session.get_inputs()]
        if input_name is None:
            if len(names) != 1:
                raise UsageError(f"{path} takes {len(names)} inputs {names}; pass "
                                 "--input_name to choose the images")
            input_name = names[0]
        elif input_name not in names:
            raise UsageError(f"{path} has no input {input_name!r} (it takes {names})")
        self.input_name = input_name
        shape = next(i.shape for i in self.session.get_inputs() if i.name == input_name)
        self.input_shape = tuple(d if isinstance(d, int) else None for d in shape[1:])
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = LOGITS if LOGITS in outputs else next(
            (o for o in outputs if LOGITS in o), outputs[0])

    def __call__(self, images):
        return self.session.run([self.output_name],
                                {self.input_name: np.asarray(images, np.float32)})[0]

    predict = __call__

    def as_tf(self):
        """images -> logits usable inside tf.function (through tf.numpy_function). Its
        `host` attribute is this runner: Square (L-inf) queries it from a numpy loop."""
        import tensorflow as tf

        def model_fn(z):
            out = tf.numpy_function(lambda a: self(a).astype(np.float32),
                                    [tf.cast(z, tf.float32)], tf.float32, stateful=False)
            out.set_shape([None, None])
            return out

        model_fn.host = self  # numpy in and out: Square's host loop calls it directly
        return model_fn


def export_onnx_beside(saved_model_path):
    """The model.onnx that export wrote beside this SavedModel (OUT/saved_model/NAME/VERSION
    next to OUT/model.onnx) and checked against it (OUT/export_report.json "passed"), or
    None."""
    import json
    import os
    folder = os.path.abspath(saved_model_path)
    for _ in range(3):
        folder = os.path.dirname(folder)
        onnx_path = os.path.join(folder, "model.onnx")
        report = os.path.join(folder, "export_report.json")
        if os.path.isfile(onnx_path) and os.path.isfile(report):
            try:
                with open(report) as f:
                    passed = json.load(f).get("passed") is True
            except (OSError, ValueError):
                return None
            return onnx_path if passed else None
    return None


def onnx_proto(model_fn, input_shape, opset=17, output_path=None):
    """ONNX of model_fn (images [N, *input_shape] -> logits) with tf2onnx, written to
    output_path if given. Converted from a tf.function with an explicit input signature
    (dynamic batch; input "images", output "logits"), not from_keras, which breaks on
    some Keras 3 models. Tensors the function captures (variables, and constants held
    outside it such as keras Normalization's mean) are frozen into the graph: the ONNX
    model has one input."""
    import logging

    import tensorflow as tf
    import tf2onnx
    from tf2onnx import tf_loader
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    spec = [tf.TensorSpec([None, *input_shape], tf.float32, name="images")]
    fn = tf.function(lambda images: {LOGITS: model_fn(images)}, input_signature=spec)
    concrete = fn.get_concrete_function(*spec)
    inputs = [t.name for t in concrete.inputs if t.dtype != tf.resource]
    outputs = [t.name for t in concrete.outputs if t.dtype != tf.resource]
    # Captured tensors that are not variables enter the graph as placeholders, which
    # tf2onnx would make inputs of the model: they become constants of their values.
    held = {internal.name: external for external, internal in concrete.graph.captures
            if internal.dtype != tf.resource}
    with tf.device("/cpu:0"):
        graph_def = tf_loader.from_function(concrete, inputs, outputs)
        for node in graph_def.node:
            if f"{node.name}:0" in held and node.op == "Placeholder":
                value = held[f"{node.name}:0"]
                node.op = "Const"
                node.attr.clear()
                node.attr["dtype"].type = value.dtype.as_datatype_enum
                node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value.numpy()))
        images = [name for name in inputs if name not in held]
        proto, _ = tf2onnx.convert._convert_common(  # noqa: SLF001 - from_function's own
            graph_def, name=concrete.name, continue_on_error=True, opset=opset,
            input_names=images, output_names=outputs, output_path=output_path,
            tensors_to_rename=tf2onnx.convert.tensor_names_from_structed(
                concrete, images, outputs))
    return proto


def onnx_runner_for(model_fn, input_shape):
    """An OnnxRunner of model_fn, converted in memory (onnx_proto). Raises UsageError with
    tf2onnx's first line when the graph cannot be converted."""
    try:
        proto = onnx_proto(model_fn, input_shape)
    except Exception as e:  # noqa: BLE001 - tf2onnx raises many kinds
        raise UsageError(f"cannot convert the model to ONNX: "
                         f"{str(e).strip().splitlines()[0][:200]}") from None
    return OnnxRunner(proto.SerializeToString())


QUERY_CHOICES = "auto, convert, none or a file"


def query_runner(choice, saved_model, model_fn, input_shape):
    """The onnxruntime model Square queries instead of model_fn (--query_onnx), and what
    it is: (OnnxRunner or None, description).

    choice: "auto" (the checked model.onnx export wrote beside saved_model, if any),
    "convert" (model_fn converted in memory), "none", or an ONNX file.
    """
    import os
    if choice == "none" or (choice == "auto" and not saved_model):
        return None, "the TensorFlow model"
    if choice == "auto":
        path = export_onnx_beside(saved_model)
        if path is None:
            return None, "the TensorFlow model (no checked model.onnx beside the SavedModel)"
        return OnnxRunner(path), path
    if choice == "convert":
        return onnx_runner_for(model_fn, input_shape), "the model converted to ONNX in memory"
    if os.path.isfile(choice):
        return OnnxRunner(choice), choice
    raise UsageError(f"--query_onnx={choice}: not {QUERY_CHOICES}")


def check_image_shape(images_shape, model_shape, what="the model"):
    """One UsageError when images of shape [N, H, W, C] do not fit what the model takes
    (a None dimension fits anything)."""
    if model_shape is None:
        return
    got, want = tuple(images_shape[1:]), tuple(model_shape)
    if len(got) != len(want) or any(w is not None and int(g) != int(w)
                                    for g, w in zip(got, want)):
        shown = "x".join("?" if w is None else str(w) for w in want)
        raise UsageError(f"the images are {'x'.join(str(g) for g in got)} but {what} takes "
                         f"{shown} (height x width x channels)")
