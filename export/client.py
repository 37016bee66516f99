"""Small clients for TF Serving's REST and gRPC APIs (and export/standin.py).

    from export.client import RestClient, GrpcClient
    rest = RestClient("http://localhost:8501", "NAME")
    rest.status(); rest.metadata(); logits = rest.predict(images)   # [N,H,W,C] in [0,1]
    grpc_client = GrpcClient("localhost:8500", "NAME")
    logits = grpc_client.predict(images)

Images are float32 [N, H, W, C] in [0, 1] at the model's input size, the network's own
input scaling: predict() refuses integer images (uint8 0-255: divide by 255 first) and
values outside [0, 1] instead of sending them, since a server would answer on the wrong
scale without complaint.

Command line (prints status, then predicted classes of the first N test images of a run
or of an .npy file of float32 [N,H,W,C] images in [0,1]):

    python -m export.client --rest=http://localhost:8501 --model=NAME --npy=images.npy
    python -m export.client --grpc=localhost:8500 --model=NAME --workdir=RUN --n=8
"""

import json
import sys
import urllib.error
import urllib.request

import numpy as np

SIGNATURE = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
GRPC_MAX_MESSAGE = 256 << 20


class ClientInputError(ValueError):
    """Images the model cannot take: refused before anything is sent."""


def check_images(images):
    """float32 [N, H, W, C] array in [0, 1], or ClientInputError saying what is wrong."""
    arr = np.asarray(images)
    if arr.dtype.kind not in "f":
        hint = (" (0-255 pixels? send x.astype('float32') / 255)" if arr.dtype.kind in "iub"
                else "")
        raise ClientInputError(f"images must be float32 in [0, 1], got dtype {arr.dtype}{hint}")
    if arr.ndim != 4 or not arr.shape[0]:
        raise ClientInputError(f"images must be a batch [N, H, W, C], got shape "
                               f"{list(arr.shape)}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ClientInputError("images hold NaN or Inf values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        hint = " (0-255 pixels? divide by 255)" if hi > 1.0 else ""
        raise ClientInputError(f"image values must be in [0, 1], got [{lo:.4g}, {hi:.4g}]"
                               f"{hint}")
    return arr


class ServingError(RuntimeError):
    """The server refused a request: `status` is the HTTP status or gRPC code name."""

    def __init__(self, status, message):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class RestClient:
    """TF Serving REST API: GET status / metadata, POST :predict."""

    def __init__(self, base_url, model_name, version=None, timeout=30.0):
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.version = version
        self.timeout = timeout

    def _model_url(self):
        url = f"{self.base_url}/v1/models/{self.model_name}"
        return url if self.version is None else f"{url}/versions/{self.version}"

    def _request(self, url, body=None):
        req = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            try:
                message = json.loads(text).get("error", text)
            except ValueError:
                message = text
            raise ServingError(e.code, message) from None

    def status(self):
        """{"model_version_status": [{"version", "state", "status"}]}"""
        return self._request(self._model_url())

    def metadata(self):
        """{"model_spec": ..., "metadata": {"signature_def": ...}}"""
        return self._request(self._model_url() + "/metadata")

    def predict_raw(self, body):
        """POST `body` (bytes or a JSON-able object) to :predict; the decoded answer."""
        if not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
        return self._request(self._model_url() + ":predict", body)

    def predict(self, images, row_format=True, signature_name=None):
        """Logits [N, K] (float32) for float32 images [N, H, W, C] in [0, 1].

        row_format=True sends {"instances": [...]} and reads "predictions";
        False sends {"inputs": {"images": [...]}} and reads "outputs".
        """
        values = check_images(images).tolist()
        body = ({"instances": values} if row_format
                else {"inputs": {INPUT_NAME: values}})
        if signature_name:
            body["signature_name"] = signature_name
        answer = self.predict_raw(body)
        out = answer["predictions"] if row_format else answer["outputs"]
        if isinstance(out, dict):  # several outputs: TF Serving keys them by name
            out = out[OUTPUT_NAME]
        return np.asarray(out, np.float32)


class GrpcClient:
    """TF Serving gRPC PredictionService (Predict, GetModelMetadata)."""

    def __init__(self, target, model_name, version=None, timeout=30.0):
        import grpc

        from keras_arat import quiet
        quiet.import_tensorflow()  # the serving API imports it; without its start-up log
        from tensorflow_serving.apis import prediction_service_pb2_grpc
        self.model_name = model_name
        self.version = version
        self.timeout = timeout
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE)])
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def _spec(self, spec, signature=True):
        spec.name = self.model_name
        if signature:
            spec.signature_name = SIGNATURE
        if self.version is not None:
            spec.version.value = int(self.version)

    def _call(self, method, request):
        import grpc
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise ServingError(e.code().name, e.details()) from None

    def predict(self, images):
        """Logits [N, K] for float32 images [N, H, W, C] in [0, 1]."""
        import tensorflow as tf
        return self.predict_tensor(tf.make_tensor_proto(check_images(images)))

    def predict_tensor(self, tensor_proto):
        """Predict with a ready TensorProto as input "images" (any dtype / shape)."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2
        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec)
        request.inputs[INPUT_NAME].CopyFrom(tensor_proto)
        response = self._call(self.stub.Predict, request)
        return tf.make_ndarray(response.outputs[OUTPUT_NAME])

    def metadata(self):
        """{signature name: SignatureDef proto}."""
        from tensorflow_serving.apis import get_model_metadata_pb2
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(request.model_spec, signature=False)
        request.metadata_field.append("signature_def")
        response = self._call(self.stub.GetModelMetadata, request)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sig_map)
        return dict(sig_map.signature_def)

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_npy(path, n):
    """The first n images of an .npy file, checked (ClientInputError otherwise)."""
    import os
    import zipfile
    if not os.path.isfile(path):
        raise ClientInputError(f"--npy={path} is not a file")
    try:
        loaded = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ClientInputError(f"cannot read {path} as an .npy file "
                               f"({' '.join(str(e).split())[:150]})") from None
    if not isinstance(loaded, np.ndarray):  # an .npz archive: several arrays
        names = ", ".join(loaded.files)
        loaded.close()
        raise ClientInputError(f"--npy={path} is an .npz archive ({names}), not an .npy "
                               "array: save the images with np.save(path, x), or give "
                               "--workdir")
    if loaded.ndim != 4:  # before slicing, which would cut a single image's rows
        raise ClientInputError(f"images must be a batch [N, H, W, C], got shape "
                               f"{list(loaded.shape)}")
    return check_images(np.array(loaded[:n]))


def main(argv=None):
    from keras_arat import errors, preflight, runs
    parser = preflight.argument_parser(description="Query a TF Serving model.")
    parser.add_argument("--rest", help="e.g. http://localhost:8501")
    parser.add_argument("--grpc", help="e.g. localhost:8500")
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--npy", help=".npy file of float32 images [N,H,W,C] in [0,1]")
    parser.add_argument("--workdir", help="take test images from this training run")
    parser.add_argument("--n", type=int, default=8, help="how many images")
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's start-up log (gRPC)")
    args = parser.parse_args(argv)
    if bool(args.rest) == bool(args.grpc):
        parser.error("give exactly one of --rest or --grpc")
    if bool(args.npy) == bool(args.workdir):
        parser.error("give exactly one of --npy or --workdir")
    if args.n < 1:
        parser.error("--n must be >= 1")
    try:
        if args.npy:
            images, labels = load_npy(args.npy, args.n), None
        else:
            cfg = preflight.check_run(args.workdir)
            data = runs.load_data(cfg.replace(n_train=1, n_test=args.n))
            images = data.x_test[:args.n].astype(np.float32) / 255.0
            labels = data.y_test[:args.n]
    except (ClientInputError, errors.UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        if args.rest:
            client = RestClient(args.rest, args.model)
            print(json.dumps(client.status()))
        else:
            if args.verbose:
                from keras_arat import quiet
                quiet.import_tensorflow(verbose=True)
            client = GrpcClient(args.grpc, args.model)
        logits = client.predict(images)
    except (ServingError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"predicted": np.argmax(logits, -1).tolist(),
                      "labels": None if labels is None else np.asarray(labels).tolist(),
                      "logits": np.round(logits, 5).tolist()}))


if __name__ == "__main__":
    main()
