"""The exported SavedModel behind the TF Serving stand-in, queried by export/client.py.

Loopback only (127.0.0.1, ports picked free); every request loop is bounded.
"""

import http.client
import json
import os
import threading

import numpy as np
import pytest

from keras_arat.deployed import OnnxRunner
from keras_arat.export import convert, fold
from keras_arat.export.client import ClientInputError, GrpcClient, RestClient, ServingError
from keras_arat.export.standin import StandIn
from tests.cli import assert_error, run_cli, start_cli, without_tensorflow
from tests.helpers import new_network, tiny_data
from tests.test_export import randomize_bn

ATOL = 1e-4
NAME = "digits"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """OUT/saved_model/NAME/1 and OUT/model.onnx of a folded split-BN network."""
    net = new_network(width=8, seed=5)
    randomize_bn(net, seed=5)
    folded = fold.fold_network(net, "adv")
    out = tmp_path_factory.mktemp("serving")
    sm = convert.saved_model_dir(str(out), NAME)
    convert.save_saved_model(folded, sm, (32, 32, 3))
    onnx_path = str(out / "model.onnx")
    convert.onnx_from_saved_model(sm, onnx_path, (32, 32, 3))
    return str(out), OnnxRunner(onnx_path)


@pytest.fixture(scope="module")
def server(exported):
    out, _ = exported
    with StandIn(os.path.join(out, "saved_model", NAME)) as s:
        yield s


@pytest.fixture(scope="module")
def images():
    return tiny_data().test[0][:16]


def test_status_and_metadata(server):
    rest = RestClient(server.rest_url, NAME)
    status = rest.status()["model_version_status"][0]
    assert status["version"] == "1" and status["state"] == "AVAILABLE"
    assert status["status"]["error_code"] == "OK"
    sig = rest.metadata()["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert list(sig["inputs"]) == ["images"] and list(sig["outputs"]) == ["logits"]
    assert sig["inputs"]["images"]["dtype"] == "DT_FLOAT"
    dims = [d["size"] for d in sig["inputs"]["images"]["tensor_shape"]["dim"]]
    assert dims == ["-1", "32", "32", "3"]
    with GrpcClient(server.grpc_target, NAME) as grpc_client:
        sigs = grpc_client.metadata()
    assert list(sigs["serving_default"].inputs) == ["images"]
    assert sigs["serving_default"].method_name == "tensorflow/serving/predict"


def test_rest_and_grpc_answers_equal_onnxruntime(server, exported, images):
    _, ort = exported
    want = ort(images)
    rest = RestClient(server.rest_url, NAME)
    np.testing.assert_allclose(rest.predict(images), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(rest.predict(images, row_format=False), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(RestClient(server.rest_url, NAME, version=1).predict(images[:1]),
                               want[:1], atol=ATOL, rtol=0)
    # Row format with named inputs, as TF Serving also accepts.
    answer = rest.predict_raw({"signature_name": "serving_default",
                               "instances": [{"images": im.tolist()} for im in images[:3]]})
    np.testing.assert_allclose(answer["predictions"], want[:3], atol=ATOL, rtol=0)
    with GrpcClient(server.grpc_target, NAME) as grpc_client:
        np.testing.assert_allclose(grpc_client.predict(images), want, atol=ATOL, rtol=0)
        np.testing.assert_allclose(grpc_client.predict(images[:1]), want[:1], atol=ATOL, rtol=0)


def test_bad_requests_are_rejected_and_serving_continues(server, exported, images):
    import tensorflow as tf
    _, ort = exported
    want = ort(images[:2])
    rest = RestClient(server.rest_url, NAME)
    good = images[:2].tolist()
    bad_bodies = [
        (b"{not json", "JSON Parse error"),
        (b"[1, 2]", "JSON object"),
        ({"instances": [[0.5, 0.5]]}, "shape [N, 32, 32, 3]"),
        ({"instances": (images[:2] * 3).tolist()}, "in [0, 1]"),
        ({"instances": (images[:2] - 1).tolist()}, "in [0, 1]"),
        (json.dumps({"instances": good}).replace("0.0", "NaN", 1).encode(), "finite"),
        ({"instances": [["a"] * 3] * 2}, "numbers"),
        ({"instances": good, "inputs": good}, "exactly one of"),
        ({"inputs": {"pixels": good}}, "single input 'images'"),
        ({"instances": good, "signature_name": "other"}, "not found in signature def"),
        ({"instances": [good[0], good[1][:5]]}, "ragged"),
        ({"instances": []}, "shape"),
    ]
    for body, message in bad_bodies:
        with pytest.raises(ServingError) as err:
            rest.predict_raw(body)
        assert err.value.status == 400 and message in err.value.message, (body, err.value)
        np.testing.assert_allclose(rest.predict(images[:2]), want, atol=ATOL, rtol=0)
    with pytest.raises(ServingError) as err:
        RestClient(server.rest_url, "unknown").predict(images[:1])
    assert err.value.status == 404
    with pytest.raises(ServingError) as err:
        RestClient(server.rest_url, NAME, version=7).status()
    assert err.value.status == 404
    with GrpcClient(server.grpc_target, NAME) as grpc_client:
        bad_tensors = [
            (tf.make_tensor_proto(images[:2].astype(np.float64)), "DT_FLOAT"),
            (tf.make_tensor_proto(images[:2, :16]), "shape"),
            (tf.make_tensor_proto(images[:2] + 2), "in [0, 1]"),
            (tf.make_tensor_proto(np.full((1, 32, 32, 3), np.nan, np.float32)), "finite"),
        ]
        for tensor, message in bad_tensors:
            with pytest.raises(ServingError) as err:
                grpc_client.predict_tensor(tensor)
            assert err.value.status == "INVALID_ARGUMENT" and message in err.value.message
            np.testing.assert_allclose(grpc_client.predict(images[:2]), want, atol=ATOL,
                                       rtol=0)
        with pytest.raises(ServingError) as err:
            GrpcClient(server.grpc_target, "unknown").predict(images[:1])
        assert err.value.status == "NOT_FOUND"


def test_oversized_batches_are_refused(exported, images):
    out, ort = exported
    with StandIn(os.path.join(out, "saved_model", NAME), max_batch=4) as small:
        rest = RestClient(small.rest_url, NAME)
        with pytest.raises(ServingError) as err:
            rest.predict(images[:5])
        assert err.value.status == 400 and "above the maximum of 4" in err.value.message
        with GrpcClient(small.grpc_target, NAME) as grpc_client:
            with pytest.raises(ServingError) as err:
                grpc_client.predict(images[:5])
            assert err.value.status == "INVALID_ARGUMENT"
            np.testing.assert_allclose(grpc_client.predict(images[:4]), ort(images[:4]),
                                       atol=ATOL, rtol=0)
        # A body above the byte limit is refused before it is read.
        conn = http.client.HTTPConnection("127.0.0.1", small.rest_port, timeout=10)
        conn.putrequest("POST", f"/v1/models/{NAME}:predict")
        conn.putheader("Content-Length", str(small.max_body + 1))
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413 and "error" in json.loads(response.read())
        conn.close()
        np.testing.assert_allclose(rest.predict(images[:4]), ort(images[:4]), atol=ATOL,
                                   rtol=0)


def test_bounded_load_without_errors(server, exported, images):
    _, ort = exported
    want = ort(images)
    threads, per_thread = 8, 25
    failures = []
    counts = [0] * threads

    def worker(t):
        rng = np.random.default_rng(t)
        rest = RestClient(server.rest_url, NAME, timeout=60)
        with GrpcClient(server.grpc_target, NAME, timeout=60) as grpc_client:
            for i in range(per_thread):
                lo = int(rng.integers(0, len(images) - 4))
                n = int(rng.integers(1, 5))
                try:
                    got = (grpc_client.predict if (t + i) % 2 else rest.predict)(
                        images[lo:lo + n])
                    if got.shape != (n, 10) or np.max(np.abs(got - want[lo:lo + n])) > ATOL:
                        failures.append(f"thread {t} request {i}: wrong answer")
                except Exception as e:  # noqa: BLE001  collected and reported below
                    failures.append(f"thread {t} request {i}: {e!r}")
                counts[t] += 1

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=180)
    assert not any(th.is_alive() for th in pool)
    assert failures == [] and sum(counts) == threads * per_thread


@pytest.mark.slow
def test_standin_and_client_command_lines(exported, images, tmp_path):
    out, ort = exported
    proc = start_cli("export.standin",
                     f"--model_base_path={os.path.join(out, 'saved_model', NAME)}")
    try:
        line = {}
        reader = threading.Thread(target=lambda: line.update(json.loads(proc.stdout.readline())))
        reader.start()
        reader.join(timeout=120)
        assert line.get("model") == NAME, "stand-in did not start"
        npy = tmp_path / "x.npy"
        np.save(npy, images[:3])
        client = run_cli("export.client", f"--rest={line['rest']}", f"--model={NAME}",
                         f"--npy={npy}", timeout=120)
        assert client.returncode == 0, client.stderr[-2000:]
        assert client.stderr == ""
        answer = json.loads(client.stdout.strip().splitlines()[-1])
        assert answer["predicted"] == np.argmax(ort(images[:3]), -1).tolist()
        # Images of another size reach the server, which refuses them: one line, exit 1.
        np.save(tmp_path / "small.npy", images[:3, :28, :28, :1])
        client = run_cli("export.client", f"--grpc={line['grpc']}", f"--model={NAME}",
                         f"--npy={tmp_path / 'small.npy'}", timeout=120)
        assert_error(client, "INVALID_ARGUMENT: input 'images' must have shape [N, 32, 32, 3], "
                             "got [3, 28, 28, 1]", status=1)
    finally:
        proc.terminate()
        stderr = proc.communicate(timeout=30)[1]
    assert stderr == ""  # quiet: no TensorFlow start-up log
    # A version folder instead of the model's base folder (which holds 1/, 2/, ...).
    version = os.path.join(out, "saved_model", NAME, "1")
    assert_error(run_cli("export.standin", f"--model_base_path={version}"),
                 "no numeric version folder")


def test_client_refuses_images_it_cannot_send(images):
    # Nothing listens on port 9: a request that was sent would fail with a connection
    # error, so ClientInputError shows the images were refused before sending.
    bad = [(np.round(images * 255).astype(np.uint8), "got dtype uint8 (0-255 pixels?"),
           (images * 255, "in [0, 1], got [0, 255] (0-255 pixels? divide by 255)"),
           (images - 0.5, "in [0, 1], got [-0.5"),
           (np.full((1, 32, 32, 3), np.nan, np.float32), "NaN or Inf"),
           (images[0], "a batch [N, H, W, C], got shape [32, 32, 3]"),
           (images[:0], "a batch [N, H, W, C], got shape [0, 32, 32, 3]")]
    rest = RestClient("http://127.0.0.1:9", NAME, timeout=5)
    with GrpcClient("127.0.0.1:9", NAME, timeout=5) as grpc_client:
        for values, message in bad:
            for client in (rest, grpc_client):
                with pytest.raises(ClientInputError) as err:
                    client.predict(values)
                assert message in str(err.value)


def test_client_and_standin_command_line_errors(images, tmp_path):
    np.savez(tmp_path / "x.npz", images=images[:2])
    np.save(tmp_path / "uint8.npy", np.round(images[:2] * 255).astype(np.uint8))
    np.save(tmp_path / "x255.npy", images[:2] * 255)
    np.save(tmp_path / "one.npy", images[0])
    (tmp_path / "notes.npy").write_text("not an array")
    rest = ["--rest=http://127.0.0.1:9", f"--model={NAME}"]
    cases = [
        ([*rest, f"--npy={tmp_path / 'x.npz'}"], "is an .npz archive (images), not an .npy"),
        ([*rest, f"--npy={tmp_path / 'uint8.npy'}"], "got dtype uint8 (0-255 pixels?"),
        ([*rest, f"--npy={tmp_path / 'x255.npy'}"], "must be in [0, 1], got [0, 255]"),
        ([*rest, f"--npy={tmp_path / 'one.npy'}"], "a batch [N, H, W, C], got shape [32, 32"),
        ([*rest, f"--npy={tmp_path / 'notes.npy'}"], "cannot read"),
        ([*rest, f"--npy={tmp_path / 'absent.npy'}"], "is not a file"),
        ([*rest, f"--workdir={tmp_path / 'absent'}"], "is not a folder"),
        ([*rest], "give exactly one of --npy or --workdir"),
        ([*rest, "--grpc=127.0.0.1:9", f"--npy={tmp_path / 'x.npz'}"],
         "give exactly one of --rest or --grpc"),
        ([*rest, f"--npy={tmp_path / 'x.npz'}", "--n=0"], "--n must be >= 1"),
    ]
    env = without_tensorflow(str(tmp_path))  # all before TensorFlow (and any request)
    for args, message in cases:
        assert_error(run_cli("export.client", *args, env=env), message)
    assert_error(run_cli("export.standin", f"--model_base_path={tmp_path / 'absent'}",
                         env=env), "is not a folder")
