"""keras_arat.convert_torch: PyTorch state_dicts in, a run folder that evaluate and export
take out; the official logits reproduced by the exported ONNX model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_arat import convert_torch as ct
from tests.test_torch_equivalence import REF, seeded_state

pytestmark = pytest.mark.slow  # end to end: subprocesses, training, export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(module, *args, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The fixture's split-BN ResNet-18 state_dict as the official train_ARAT.py would
    save it under DataParallel (`module.` prefix) in .npz, and bare in .safetensors."""
    from safetensors.numpy import save_file
    folder = tmp_path_factory.mktemp("torch_checkpoints")
    state = seeded_state("r18s_")
    npz = str(folder / "last.npz")
    np.savez(npz, **{f"module.{k}": v for k, v in state.items()})
    safetensors = str(folder / "last.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, safetensors)
    return state, npz, safetensors, folder


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory):
    _, npz, safetensors, _ = checkpoints
    out = {}
    for name, path in (("npz", npz), ("safetensors", safetensors)):
        workdir = str(tmp_path_factory.mktemp("converted") / name)
        proc = run_cli("keras_arat.convert_torch", f"--checkpoint={path}", "--model=resnet18",
                       "--num_classes=10", f"--workdir={workdir}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = workdir
    return out


def test_workdir_holds_a_run_and_both_formats_give_the_same_weights(converted):
    import tensorflow as tf
    cfg = json.load(open(os.path.join(converted["npz"], "config.json")))
    assert (cfg["model"], cfg["method"], cfg["split_bn"], cfg["num_classes"]) == \
        ("resnet18", "arat", True, 10)
    assert cfg["converted_from"]["layout"] == "split_bn"
    assert cfg["converted_from"]["tensors"] == len(
        [k for k in REF["r18s_keys"] if not k.endswith("num_batches_tracked")])
    ckpts = [os.path.join(converted[n], "checkpoints", "epoch-0100", "ckpt")
             for n in ("npz", "safetensors")]
    names = [n for n, _ in tf.train.list_variables(ckpts[0])]
    assert names == [n for n, _ in tf.train.list_variables(ckpts[1])]
    for name in names:
        if name != "_CHECKPOINTABLE_OBJECT_GRAPH" and "predictor" not in name:
            np.testing.assert_array_equal(tf.train.load_variable(ckpts[0], name),
                                          tf.train.load_variable(ckpts[1], name))


def test_export_of_the_converted_run_reproduces_the_official_logits(converted, tmp_path):
    """convert_torch then export, on a machine without CIFAR-10: the checks run on random
    images and say so; the ONNX model gives the official adv-branch logits (eval mode)."""
    import onnxruntime as ort
    out = str(tmp_path / "exported")
    proc = run_cli("export", f"--workdir={converted['safetensors']}", f"--out={out}",
                   "--n_examples=8", "--formats=onnx")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(os.path.join(out, "export_report.json")))
    if report["parity_data"]["kind"] == "random_uniform":  # no CIFAR-10 here
        assert report["accuracy"] is None and report["pgd20_accuracy"] is None
        assert "cifar10" in report["parity_data"]["why"]
    assert report["passed"] and report["branch"] == "adv"
    session = ort.InferenceSession(os.path.join(out, "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"images": REF["r18_x"]})[0]
    diff = float(np.abs(logits - REF["r18s_logits_eval_adv"]).max())
    print(f"official logits vs ONNX after convert_torch and export: {diff:.1e} "
          f"(largest logit {np.abs(REF['r18s_logits_eval_adv']).max():.1f})")
    assert diff <= 1e-4


def test_evaluate_takes_the_converted_run(checkpoints, converted, tmp_path):
    """keras_arat.evaluate on the converted run: without CIFAR-10, one error line naming
    the data set; with a data set in config.json it evaluates and records it."""
    proc = run_cli("keras_arat.evaluate", f"--workdir={converted['npz']}", "--n_examples=8",
                   "--attacks=clean")
    if proc.returncode != 0:
        assert "cifar10" in error_line(proc)
    digits = str(tmp_path / "digits")
    _, npz, _, _ = checkpoints
    proc = run_cli("keras_arat.convert_torch", f"--checkpoint={npz}", "--model=resnet18",
                   "--dataset=digits", f"--workdir={digits}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("keras_arat.evaluate", f"--workdir={digits}", "--n_examples=16",
                   "--attacks=clean,pgd20", "--batch_size=16", "--noprogress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (entry,) = json.loads(proc.stdout)["evaluated"]
    assert entry["n_examples"] == 16 and entry["epoch"] == 100
    assert entry["checkpoint"] == "checkpoints/epoch-0100"
    assert 0.0 <= entry["accuracy"]["pgd20"] <= entry["accuracy"]["clean"] <= 1.0
    assert "pgd20-leak" not in entry["accuracy"]  # a converted run was not trained with it
    record = json.load(open(os.path.join(digits, entry["record"])))
    (pgd,) = [r for r in record["results"] if r["attack"] == "pgd20"]
    assert pgd["settings"]["reference_noise_leak"] is False


# ----------------------------------------------------------------------- refusals

def test_single_bn_state_dicts_with_model_prefix(tmp_path):
    """A plain ResNet-18 (shortcut.0 / shortcut.1 keys) under the feature-extractor
    wrapper's `model.` prefix loads as a single-BN network with the official logits."""
    state = {f"model.{k}": v for k, v in seeded_state("r18p_").items()}
    network, info = ct.build_network(ct.strip_prefixes(state), "resnet18")
    assert info == {"split_bn": False, "num_classes": 10}
    want = REF["r18p_logits_eval"]
    got = network(REF["r18_x"], training=False).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_strict_key_accounting_names_the_keys():
    state = dict(seeded_state("r18p_"))
    extra = dict(state, **{"layer9.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)})
    with pytest.raises(ct.ConversionError, match=r"1 key\(s\) of the checkpoint not used: "
                                                  r"layer9\.0\.conv1\.weight"):
        ct.build_network(extra, "resnet18")
    missing = {k: v for k, v in state.items() if not k.startswith("layer4.1.bn2.")}
    with pytest.raises(ct.ConversionError, match=r"4 weight\(s\) missing .*layer4\.1\.bn2"):
        ct.build_network(missing, "resnet18")
    wrong = dict(state, **{"linear.bias": np.zeros(7, np.float32)})
    with pytest.raises(ct.ConversionError, match=r"linear\.bias: shape \(7,\)"):
        ct.build_network(wrong, "resnet18")
    with pytest.raises(ct.ConversionError, match="not a wrn state_dict .is it a resnet18"):
        ct.build_network(state, "wrn")
    with pytest.raises(ct.ConversionError, match="--num_classes=100 but"):
        ct.build_network(state, "resnet18", num_classes=100)


def test_cli_refusals_are_one_line_and_write_nothing(checkpoints, tmp_path):
    _, npz, _, folder = checkpoints
    pt = folder / "last.pt"
    pt.write_bytes(b"not read")
    bad = folder / "bad.npz"
    np.savez(bad, **{"conv1.weight": np.zeros((64, 3, 3, 3), np.float32),
                     "linear.weight": np.zeros((10, 512), np.float32)})
    cases = [
        ([f"--checkpoint={bad}", "--model=resnet18"], "weight(s) missing from the checkpoint"),
        ([f"--checkpoint={bad}", "--model=resnet18", "--num_classes=100"],
         "--num_classes=100 but the checkpoint's linear.weight has 10 outputs"),
        ([f"--checkpoint={npz}", "--model=wrn"], "not a wrn state_dict"),
        ([f"--checkpoint={folder / 'absent.npz'}", "--model=resnet18"], "is not a file"),
        ([f"--checkpoint={npz}", "--model=resnet18", "--method=pgd_at"],
         "split-BN checkpoint cannot be a --method=pgd_at run"),
    ]
    try:
        import torch  # noqa: F401
    except ImportError:  # CI: no torch
        cases.append(([f"--checkpoint={pt}", "--model=resnet18"],
                      "install torch (pip install torch) to read it, or pass the "
                      "state_dict as .safetensors or .npz"))
    for args, message in cases:
        workdir = tmp_path / "out"
        proc = run_cli("keras_arat.convert_torch", *args, f"--workdir={workdir}")
        assert proc.returncode == 2 and message in error_line(proc), (args, proc.stderr[-500:])
        assert not workdir.exists() and not [p for p in os.listdir(tmp_path)
                                             if p.startswith(".out")]
    existing = tmp_path / "existing"
    existing.mkdir()
    proc = run_cli("keras_arat.convert_torch", f"--checkpoint={npz}", "--model=resnet18",
                   f"--workdir={existing}")
    assert proc.returncode == 2 and "exists; pass --overwrite" in error_line(proc)
