"""A loopback stand-in for TF Serving, for tests and demos where the real server is absent.

    python -m export.standin --model_base_path=OUT/saved_model/NAME [--model_name=NAME]
        [--rest_port=0] [--grpc_port=0] [--max_batch=1024]

It loads the newest numeric version under model_base_path (the layout TF Serving reads)
and implements the part of TF Serving's documented API that export/client.py uses:

REST (http.server.ThreadingHTTPServer)
  GET  /v1/models/NAME[/versions/V]            model status
  GET  /v1/models/NAME[/versions/V]/metadata   signature metadata
  POST /v1/models/NAME[/versions/V]:predict    {"instances": ...} -> {"predictions": ...}
                                               {"inputs": ...}    -> {"outputs": ...}
gRPC (tensorflow_serving.apis)
  PredictionService.Predict, PredictionService.GetModelMetadata,
  ModelService.GetModelStatus

Bad requests (malformed JSON, wrong shape or dtype, NaN or values outside [0, 1], batches
above --max_batch, unknown signature or input) answer HTTP 400 with {"error": message}
(404 for an unknown model or version) and gRPC INVALID_ARGUMENT (NOT_FOUND); the server
keeps serving. Ports 0 pick free ports; the chosen ones are printed as one JSON line.
It binds 127.0.0.1 only. It is not a production server: use tensorflow/serving.
"""

import json
import os
import re
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

SIGNATURE = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_MAX_BATCH = 1024
GRPC_MAX_MESSAGE = 256 << 20  # bytes; a 1024 x 224x224x3 float batch is ~616 MB, so
# large images need a smaller --max_batch; 32x32x3 at 1024 is 12.6 MB.


class RequestError(ValueError):
    """A bad request: HTTP `status` and gRPC code name `code`."""

    def __init__(self, message, status=400, code="INVALID_ARGUMENT"):
        super().__init__(message)
        self.status = status
        self.code = code


def latest_version(base_path):
    versions = [int(d) for d in os.listdir(base_path)
                if d.isdigit() and os.path.isdir(os.path.join(base_path, d))]
    if not versions:
        raise FileNotFoundError(f"no numeric version folder under {base_path}")
    return max(versions)


class ServedModel:
    """A SavedModel's serving_default, with TF Serving-like validation of inputs."""

    def __init__(self, base_path, name, max_batch=DEFAULT_MAX_BATCH):
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2
        self.name = name
        self.base_path = os.path.abspath(base_path)
        self.version = latest_version(self.base_path)
        path = os.path.join(self.base_path, str(self.version))
        self.max_batch = int(max_batch)
        self._loaded = tf.saved_model.load(path)
        self._fn = self._loaded.signatures[SIGNATURE]
        spec = self._fn.structured_input_signature[1][INPUT_NAME]
        self.image_shape = tuple(int(d) for d in spec.shape[1:])
        proto = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            proto.ParseFromString(f.read())
        graph = proto.meta_graphs[0]
        # TF Serving's metadata lists the user signatures only.
        self.signature_defs = {k: v for k, v in graph.signature_def.items()
                               if not k.startswith("__")}

    # -- validation shared by REST and gRPC -------------------------------------------
    def check_signature(self, signature_name):
        name = signature_name or SIGNATURE
        if name not in self.signature_defs:
            raise RequestError(f"Serving signature name: \"{name}\" not found in "
                               f"signature def")
        return name

    def check_version(self, version):
        if version is not None and int(version) != self.version:
            raise RequestError(f"Servable not found for request: Specific({self.name}, "
                               f"{version})", 404, "NOT_FOUND")

    def validate(self, images):
        """float32 [N, H, W, C] array in [0, 1], or RequestError."""
        arr = np.asarray(images)
        if arr.dtype == object or arr.dtype.kind not in "fiu":
            raise RequestError(f"input '{INPUT_NAME}' must be numbers (float32), got "
                               f"{arr.dtype if arr.dtype != object else 'ragged or mixed values'}")
        if arr.ndim != 1 + len(self.image_shape) or arr.shape[1:] != self.image_shape:
            raise RequestError(f"input '{INPUT_NAME}' must have shape [N, "
                               f"{', '.join(map(str, self.image_shape))}], got "
                               f"{list(arr.shape)}")
        if arr.shape[0] < 1:
            raise RequestError("empty batch")
        if arr.shape[0] > self.max_batch:
            raise RequestError(f"batch of {arr.shape[0]} is above the maximum of "
                               f"{self.max_batch}")
        arr = arr.astype(np.float32)
        if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
            raise RequestError(f"input '{INPUT_NAME}' values must be finite and in [0, 1]")
        return arr

    def predict(self, images):
        import tensorflow as tf
        out = self._fn(**{INPUT_NAME: tf.constant(self.validate(images))})
        return out[OUTPUT_NAME].numpy()

    # -- REST documents -----------------------------------------------------------------
    def status_json(self):
        return {"model_version_status": [{
            "version": str(self.version), "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}]}

    def metadata_json(self):
        from google.protobuf import json_format
        sigs = {k: json_format.MessageToDict(v, preserving_proto_field_name=True)
                for k, v in self.signature_defs.items()}
        return {"model_spec": {"name": self.name, "signature_name": "",
                               "version": str(self.version)},
                "metadata": {"signature_def": {"signature_def": sigs}}}


def _decode_images(value):
    """A JSON value (nested lists, or {"images": nested lists}) -> numpy array."""
    if isinstance(value, dict):
        if set(value) != {INPUT_NAME}:
            raise RequestError(f"expected the single input '{INPUT_NAME}', got "
                               f"{sorted(value)}")
        value = value[INPUT_NAME]
    try:
        arr = np.array(value)
    except ValueError:  # ragged nesting
        raise RequestError("input is ragged: every instance must have the same shape") \
            from None
    if arr.dtype == bool:
        raise RequestError(f"input '{INPUT_NAME}' must be numbers (float32), got bool")
    return arr


def parse_predict_body(body):
    """(images array, signature_name, row_format) from a REST predict body (bytes)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"JSON Parse error: {e}") from None
    if not isinstance(doc, dict):
        raise RequestError("request body must be a JSON object")
    has_instances, has_inputs = "instances" in doc, "inputs" in doc
    if has_instances == has_inputs:
        raise RequestError("request must have exactly one of 'instances' (row format) "
                           "or 'inputs' (columnar format)")
    signature = doc.get("signature_name")
    if signature is not None and not isinstance(signature, str):
        raise RequestError("signature_name must be a string")
    if has_instances:
        rows = doc["instances"]
        if not isinstance(rows, list):
            raise RequestError("'instances' must be a list")
        if rows and all(isinstance(r, dict) for r in rows):
            rows = [_decode_images(r) for r in rows]
            if len({r.shape for r in rows}) > 1:
                raise RequestError("instances have different shapes")
        arr = _decode_images(rows)
        return arr, signature, True
    return _decode_images(doc["inputs"]), signature, False


_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?(/metadata|:predict)?$")


def _make_handler(model, max_body):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "keras_arat-standin"

        def log_message(self, fmt, *args):  # quiet: tests run thousands of requests
            pass

        def _send(self, status, doc):
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self, method):
            m = _PATH.match(self.path.split("?", 1)[0])
            if not m:
                raise RequestError(f"Malformed request: {method} {self.path}", 404,
                                   "NOT_FOUND")
            name, version, action = m.group(1), m.group(2), m.group(3) or ""
            if name != model.name:
                raise RequestError(f"Servable not found for request: Latest({name})",
                                   404, "NOT_FOUND")
            model.check_version(version)
            if (method == "POST") != (action == ":predict"):
                raise RequestError(f"Malformed request: {method} {self.path}", 405,
                                   "UNIMPLEMENTED")
            return action

        def do_GET(self):
            try:
                action = self._route("GET")
                self._send(200, model.metadata_json() if action == "/metadata"
                           else model.status_json())
            except RequestError as e:
                self._send(e.status, {"error": str(e)})

        def do_POST(self):
            try:
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    self.close_connection = True
                    raise RequestError("Content-Length is required", 411)
                length = int(length)
                if length > max_body:
                    self.close_connection = True  # the body is not read
                    raise RequestError(f"request body of {length} bytes is above the "
                                       f"maximum of {max_body}", 413)
                body = self.rfile.read(length)
                self._route("POST")
                images, signature, rows = parse_predict_body(body)
                model.check_signature(signature)
                logits = model.predict(images).tolist()
                self._send(200, {"predictions": logits} if rows else {"outputs": logits})
            except RequestError as e:
                self._send(e.status, {"error": str(e)})
            except Exception as e:  # never let one request take the server down
                self._send(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    return Handler


def _make_grpc_servicers(model):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                         model_service_pb2_grpc, predict_pb2,
                                         prediction_service_pb2_grpc)

    def abort(context, e):
        context.abort(getattr(grpc.StatusCode, e.code), str(e))

    def check_spec(spec):
        if spec.name != model.name:
            raise RequestError(f"Servable not found for request: Latest({spec.name})",
                               404, "NOT_FOUND")
        if spec.HasField("version"):
            model.check_version(spec.version.value)

    class Prediction(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            try:
                check_spec(request.model_spec)
                model.check_signature(request.model_spec.signature_name)
                if set(request.inputs) != {INPUT_NAME}:
                    raise RequestError(f"expected the single input '{INPUT_NAME}', got "
                                       f"{sorted(request.inputs)}")
                proto = request.inputs[INPUT_NAME]
                if proto.dtype != tf.float32.as_datatype_enum:
                    raise RequestError(f"input '{INPUT_NAME}' must be DT_FLOAT, got "
                                       f"{tf.dtypes.as_dtype(proto.dtype).name}")
                try:
                    images = tf.make_ndarray(proto)
                except Exception as e:  # inconsistent shape / content
                    raise RequestError(f"cannot decode input tensor: {e}") from None
                logits = model.predict(images)
            except RequestError as e:
                abort(context, e)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = model.name
            response.model_spec.version.value = model.version
            response.model_spec.signature_name = SIGNATURE
            response.outputs[OUTPUT_NAME].CopyFrom(tf.make_tensor_proto(logits))
            return response

        def GetModelMetadata(self, request, context):
            try:
                check_spec(request.model_spec)
                if list(request.metadata_field) != ["signature_def"]:
                    raise RequestError("metadata_field must be ['signature_def']")
            except RequestError as e:
                abort(context, e)
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            for k, v in model.signature_defs.items():
                sig_map.signature_def[k].CopyFrom(v)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = model.name
            response.model_spec.version.value = model.version
            response.metadata["signature_def"].Pack(sig_map)
            return response

    class Status(model_service_pb2_grpc.ModelServiceServicer):
        def GetModelStatus(self, request, context):
            try:
                check_spec(request.model_spec)
            except RequestError as e:
                abort(context, e)
            response = get_model_status_pb2.GetModelStatusResponse()
            status = response.model_version_status.add()
            status.version = model.version
            status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
            return response

    return (Prediction(), prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server,
            Status(), model_service_pb2_grpc.add_ModelServiceServicer_to_server)


class StandIn:
    """REST + gRPC stand-in on 127.0.0.1. Use as a context manager or start()/stop()."""

    def __init__(self, model_base_path, model_name=None, rest_port=0, grpc_port=0,
                 max_batch=DEFAULT_MAX_BATCH, workers=8):
        name = model_name or os.path.basename(os.path.abspath(model_base_path))
        self.model = ServedModel(model_base_path, name, max_batch)
        # Enough for max_batch images as JSON text (about 12 bytes per number).
        n_values = int(np.prod(self.model.image_shape)) * self.model.max_batch
        self.max_body = max(1 << 20, 16 * n_values)
        self._rest_port, self._grpc_port, self.workers = rest_port, grpc_port, workers
        self._http = self._grpc = self._thread = None

    def start(self):
        import grpc
        self._http = ThreadingHTTPServer(("127.0.0.1", self._rest_port),
                                         _make_handler(self.model, self.max_body))
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever,
                                        name="standin-rest", daemon=True)
        self._thread.start()
        options = [("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
                   ("grpc.max_send_message_length", GRPC_MAX_MESSAGE)]
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers),
                                 options=options)
        pred, add_pred, status, add_status = _make_grpc_servicers(self.model)
        add_pred(pred, self._grpc)
        add_status(status, self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"127.0.0.1:{self._grpc_port}")
        if not self.grpc_port:
            raise OSError(f"cannot bind gRPC port {self._grpc_port}")
        self._grpc.start()
        self.rest_port = self._http.server_address[1]
        return self

    @property
    def rest_url(self):
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def grpc_target(self):
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self):
        if self._grpc is not None:
            self._grpc.stop(grace=1).wait()
            self._grpc = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._thread.join(timeout=5)
            self._http = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None):
    import signal

    from keras_arat import preflight, quiet
    parser = preflight.argument_parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_base_path", required=True,
                        help="OUT/saved_model/NAME (holds version folders 1/, 2/, ...)")
    parser.add_argument("--model_name", default=None, help="default: the folder name")
    parser.add_argument("--rest_port", type=int, default=0)
    parser.add_argument("--grpc_port", type=int, default=0)
    parser.add_argument("--max_batch", type=int, default=DEFAULT_MAX_BATCH)
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's start-up log")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.model_base_path):
        parser.error(f"--model_base_path={args.model_base_path} is not a folder (give "
                     "OUT/saved_model/NAME, which holds the version folders 1/, 2/, ...)")
    quiet.import_tensorflow(args.verbose)
    try:
        server = StandIn(args.model_base_path, args.model_name, args.rest_port,
                         args.grpc_port, args.max_batch).start()
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"model": server.model.name, "version": server.model.version,
                      "rest": server.rest_url, "grpc": server.grpc_target}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
