"""Write a folded Keras model as a TF Serving SavedModel and as ONNX, and check the ONNX
file against the export contract. Reading them back: keras_arat.deployed (one runner of
each kind, shared with keras_arat.evaluate)."""

import os

import tensorflow as tf

from keras_arat.deployed import SavedModelRunner, onnx_proto

from .fold import INPUT_NAME, OUTPUT_NAME

SIGNATURE = "serving_default"
DEFAULT_OPSET = 17


def input_spec(input_shape):
    return tf.TensorSpec([None, *input_shape], tf.float32, name=INPUT_NAME)


def save_saved_model(model, path, input_shape):
    """SavedModel at `path` whose serving_default maps "images" -> {"logits": [N, K]}."""
    import keras
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(images):
        return {OUTPUT_NAME: model(images, training=False)}

    archive.add_endpoint(name=SIGNATURE, fn=serve, input_signature=[input_spec(input_shape)])
    archive.write_out(path, verbose=False)


def to_onnx(fn, output_path, input_shape, opset=DEFAULT_OPSET):
    """Convert `fn` (images -> logits) with tf2onnx (keras_arat.deployed.onnx_proto: a
    tf.function with an explicit input signature, batch dimension None, so the ONNX input
    "images" has a dynamic batch)."""
    return onnx_proto(fn, input_shape, opset, output_path)


def onnx_from_saved_model(saved_model_path, output_path, input_shape, opset=DEFAULT_OPSET):
    """ONNX of the SavedModel's serving_default signature: the served graph itself."""
    runner = SavedModelRunner(saved_model_path)  # keeps the loaded variables alive
    return to_onnx(runner, output_path, input_shape, opset)


def onnx_from_keras(model, output_path, input_shape, opset=DEFAULT_OPSET):
    """ONNX of a Keras model traced through a tf.function (used without a SavedModel)."""
    return to_onnx(lambda images: model(images, training=False), output_path,
                   input_shape, opset)


def check_onnx(path):
    """Problems with the ONNX file as a list of strings (empty if it meets the contract)."""
    import onnx
    model = onnx.load(path)
    problems = []
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # onnx raises ValidationError / InferenceError
        problems.append(f"onnx.checker: {str(e).splitlines()[0]}")
    ops = op_types(model)
    if "BatchNormalization" in ops:
        problems.append("graph has a BatchNormalization node")
    foreign = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        problems.append(f"graph uses non-standard op domains {foreign}")
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        problems.append(f"inputs/outputs are {inputs}/{outputs}, expected "
                        f"[{INPUT_NAME!r}]/[{OUTPUT_NAME!r}]")
    else:
        batch = model.graph.input[0].type.tensor_type.shape.dim[0]
        if batch.HasField("dim_value"):
            problems.append(f"batch dimension is fixed at {batch.dim_value}")
    return problems


def op_types(model):
    """{op_type: count} of an onnx ModelProto's graph."""
    counts = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def saved_model_dir(out, name, version=1):
    return os.path.join(out, "saved_model", name, str(version))
