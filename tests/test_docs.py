"""Every command and Python snippet in README.md, BUILD.md and BENCHMARKS.md is tested.

tests/docs.py reads the commands out of the three documents. COVERAGE says, for each one
word for word, how it is tested, and test_every_documented_command_is_covered fails as
soon as a document gains, loses or changes a command, so they cannot drift apart:

  run       run in a fresh working folder, as on a fresh clone (configs/ and benchmarks/
            linked in, the package on PYTHONPATH, no runs/ or exports/), with test-size
            flags appended (later flags win, for absl and argparse alike) and TF Serving's
            ports 8500/8501 swapped for free ones; [optional] parts of a usage line are
            left out. Each must exit 0 and print no TensorFlow start-up log.
  validate  GPU and several-machine jobs: parsed by keras_arat.train's own flag parsing,
            config checks and TF_CONFIG check, not trained (their data and devices are
            not here); one of them, configs/cifar.flags, also trains on the test-size
            model inside the CIFAR grid command's test-size run.
  synopsis  a usage line: every --flag it names is a flag of its command.
  elsewhere run by another test or by CI, or not runnable here (Docker, the network), as
            the reason says.
"""

import json
import os
import re
import shlex
import socket
import sys
import threading
from importlib import metadata

import numpy as np
import pytest

from keras_arat import quiet
from tests import cli, docs

ROOT = cli.ROOT
# The quickstart at test size: its flagfile, fewer and smaller everything.
TINY_TRAIN = ["--n_train=256", "--n_test=64", "--batch_size=64", "--cnn_width=8",
              "--attack_steps=2", "--epochs=2", "--a_prev_examples=64", "--eval_examples=64"]
TINY_GRID = ("--overrides=n_train=128,n_test=64,batch_size=64,cnn_width=8,attack_steps=1,"
             "epochs=1,eps_warmup_epochs=0,eval_examples=16,a_prev_examples=64")
TINY_GRID_CIFAR = ("--overrides=dataset=digits,model=small_cnn,cnn_width=8,n_train=128,"
                   "n_test=64,batch_size=64,attack_steps=1,epochs=1,eval_examples=16,"
                   "a_prev_examples=64")
GRID_ONE_CELL = ["--seeds=0", "--only_rows=arat", "--min_clean_acc=0", "--min_robust_acc=0"]
TINY_STEP_TIME = ["--model=small_cnn", "--cnn_width=4", "--batch_size=8", "--steps=1",
                  "--warmup=1", "--attack_steps=1"]
TINY_EXPORT = ["--n_examples=32", "--pgd_examples=16"]
TINY_LATENCY = ["--n_examples=32", "--repeats_b1=2", "--repeats_b128=2"]
TINY_EVAL = ["--n_examples=8", "--batch_size=8"]

QUICKSTART = "python -m keras_arat.train --flagfile=configs/quickstart.flags"
QUICKSTART_BENCH = "python benchmarks/quickstart.py"
STANDIN = ("python -m export.standin --model_base_path=exports/quickstart/saved_model/quickstart"
           " --rest_port=8501 --grpc_port=8500")
CLIENT = "python -m export.client --grpc=localhost:8500 --model=quickstart --workdir=runs/quickstart"
CURL_PREDICT = ("curl -X POST http://localhost:8501/v1/models/quickstart:predict -d "
                "'{\"signature_name\": \"serving_default\", \"instances\": [[[[0.0, 0.0, 0.0], "
                "...]]]}'")
TF_CONFIG_TWO_HOSTS = ('\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": '
                       '{"type": "worker", "index": 0}}\'')
STEP_TIME = "python benchmarks/step_time.py"
GPU_TRAIN = {  # command -> what its flagfile must set
    "python -m keras_arat.train --flagfile=configs/cifar.flags": ("cifar10", "resnet18", "arat"),
    "python -m keras_arat.train --flagfile=configs/cifar100.flags": ("cifar100", "resnet18",
                                                                     "arat"),
    "python -m keras_arat.train --flagfile=configs/wrn34_cifar10.flags": ("cifar10", "wrn",
                                                                          "arat"),
    "python -m keras_arat.train --flagfile=configs/pgd_at_cifar.flags": ("cifar10", "resnet18",
                                                                        "pgd_at"),
    "python -m keras_arat.train --flagfile=configs/cifar.flags --strategy=mirrored "
    "--mixed_precision=auto": ("cifar10", "resnet18", "arat"),
    "python -m keras_arat.train --flagfile=cifar.flags [--workdir=DIR] [--flag=value ...]":
        ("cifar10", "resnet18", "arat"),
    f"TF_CONFIG={TF_CONFIG_TWO_HOSTS} python -m keras_arat.train --flagfile=configs/cifar.flags "
    "--strategy=multi_worker": ("cifar10", "resnet18", "arat"),
    "python -m keras_arat.train --flagfile=configs/cifar.flags --strategy=multi_worker "
    "--mixed_precision=auto --workdir=/shared/runs/cifar10_resnet18_arat": ("cifar10", "resnet18",
                                                                            "arat"),
}

# Every documented command, word for word -> (how, detail). Shell commands joined by &&
# are looked up part by part.
COVERAGE = {
    "pip install -r requirements.txt": ("run", "test_requirements_are_installed_as_pinned"),
    QUICKSTART: ("run", TINY_TRAIN),
    "python -m pytest -q -n 2 tests": ("elsewhere", ".ci/run runs it: the suite this test is "
                                       "in (test_ci_runs_the_readme_test_command)"),
    "python -m keras_arat.train --helpfull": ("run", []),
    "python -m ruff check .": ("run", "as written, in the repository (test_lint_command_passes)"),
    'python -m pytest -q -n 2 -m "not slow" tests': (
        "elsewhere", "the fast part of this suite (test_fast_tier_leaves_out_the_slow_tests "
        "collects it)"),
    "python -m keras_arat.evaluate --workdir=runs/quickstart "
    "--attacks=clean,pgd20,cw,autoattack --branch=both --n_examples=1000": ("run", TINY_EVAL),
    "python -m export --workdir=runs/quickstart --out=exports/quickstart [--branch=adv|clean]":
        ("run", TINY_EXPORT),
    "python -m keras_arat.evaluate --workdir=DIR [--checkpoint=latest|best|swa|epoch-N] "
    "[--branch=adv|clean|both] [--attacks=clean,pgd20,cw] [--n_examples=N] [--batch_size=B] "
    "[--eps=E] [--output_dir=OUT]": ("synopsis", "keras_arat/evaluate.py"),
    "python -m export --workdir=runs/quickstart --out=exports/quickstart [--branch=adv|clean] "
    "[--name=NAME] [--formats=saved_model,onnx,keras] [--checkpoint=RUN/checkpoints/epoch-0005 "
    "| --keras_model=network.keras] [--overwrite] [--opset=17] [--atol=1e-4] "
    "[--n_examples=1000] [--pgd_examples=N]": ("synopsis", "export/cli.py"),
    "python -m export": ("synopsis", "export/cli.py"),
    "python -m keras_arat.evaluate": ("synopsis", "keras_arat/evaluate.py"),
    "python -m keras_arat.experiments --flagfile=configs/tradeoff_quickstart.flags "
    "--workdir=runs/tradeoff": ("run", [TINY_GRID, *GRID_ONE_CELL]),
    "python -m keras_arat.experiments --flagfile=configs/tradeoff_cifar.flags "
    "--workdir=runs/tradeoff_cifar": ("run", [TINY_GRID_CIFAR, *GRID_ONE_CELL]),
    "python -m keras_arat.experiments --flagfile=configs/ablation_quickstart.flags "
    "--workdir=runs/ablation": ("run", [TINY_GRID, *GRID_ONE_CELL]),
    **{command: ("validate", expected) for command, expected in GPU_TRAIN.items()},
    f"export TF_CONFIG={TF_CONFIG_TWO_HOSTS}": ("validate", "the next command's environment"),
    # BUILD.md's evaluation of a CIFAR run: the same evaluation of the test-size run.
    "python -m keras_arat.evaluate --workdir=runs/cifar10_resnet18_arat --branch=both "
    "--attacks=clean,pgd20,cw": ("run", TINY_EVAL),
    ".ci/run": ("elsewhere", "CI itself (test_ci_runs_the_readme_test_command checks it)"),
    "python3 -m venv .venv": ("elsewhere", ".ci/run makes its environment with python3 -m venv"),
    ". .venv/bin/activate": ("elsewhere", ".ci/run activates the environment it made"),
    "pip install -r requirements.txt 'tensorflow[and-cuda]==2.21.0'": (
        "elsewhere", "a GPU host's CUDA wheels (test_requirements_are_installed_as_pinned "
        "checks the pinned tensorflow version is the one named)"),
    'python -c "import tensorflow as tf; print(tf.config.list_physical_devices(\'GPU\'))"':
        ("run", []),
    'python -c "import tensorflow_datasets as tfds; '
    'tfds.builder(\'cifar10\').download_and_prepare()"': (
        "elsewhere", "needs the network; tests/test_data.py prepares TFDS data offline"),
    "docker run -p 8500:8500 -p 8501:8501 -v "
    '"$PWD/exports/quickstart/saved_model/quickstart:/models/quickstart" '
    "-e MODEL_NAME=quickstart tensorflow/serving": (
        "elsewhere", "needs Docker and the tensorflow/serving image; the stand-in serving "
        "the same REST and gRPC API on the same ports is run instead"),
    "curl http://localhost:8501/v1/models/quickstart": ("run", []),
    "curl http://localhost:8501/v1/models/quickstart/metadata": ("run", []),
    CURL_PREDICT: ("run", "with the image the ... stands for: one 32x32x3 image of zeros"),
    CLIENT: ("run", []),
    STANDIN: ("run", []),
    "python benchmarks/export_latency.py --workdir=runs/quickstart": ("run", TINY_LATENCY),
    f"{STEP_TIME} --model=resnet18 --batch_size=128": ("run", TINY_STEP_TIME),
    QUICKSTART_BENCH: ("run", ["--min_clean=0", "--min_pgd20=0", "--max_seconds=3600",
                               *TINY_TRAIN]),
    "python benchmarks/export_latency.py --workdir=runs/quickstart_bench": ("run", TINY_LATENCY),
    f"{STEP_TIME} --methods=pgd_at,arat,arat_two_pass,trades --steps=20": ("run", TINY_STEP_TIME),
    f"{STEP_TIME} --model=resnet18 --batch_size=32 --methods=pgd_at,arat,arat_two_pass,trades "
    "--steps=6": ("run", TINY_STEP_TIME),
    f"{STEP_TIME} --methods=pgd_at,arat --steps=10 --mixed_precision=bfloat16": (
        "run", TINY_STEP_TIME),
    f"{STEP_TIME} --model=resnet18 --batch_size=128 --jit_compile": ("run", TINY_STEP_TIME),
    f"{STEP_TIME} --model=resnet18 --batch_size=128 --mixed_precision=float16": (
        "run", TINY_STEP_TIME),
    f"{STEP_TIME} --model=wrn --batch_size=128 --methods=pgd_at,arat,arat_two_pass,trades": (
        "run", TINY_STEP_TIME),
    # Installing the package (BUILD.md).
    "pip install .": ("elsewhere", "tests/test_install.py builds the wheel of this tree and "
                      "installs it (offline, --no-deps: requirements.txt's set is the env's)"),
    "pip install '.[serving]'": ("elsewhere", "the extra's packages are requirements.txt's "
                                 "(installed in CI); tests/test_install.py installs the wheel"),
    "python -m keras_arat.train": ("elsewhere", "tests/test_install.py runs it from the "
                                   "installed wheel, outside the checkout"),
    "python -m keras_arat.export": ("elsewhere", "tests/test_install.py runs it from the "
                                    "installed wheel, outside the checkout"),
    # The official PyTorch code (README.md, BUILD.md): a side environment, never CI's.
    "python3 -m venv /tmp/torchref": ("elsewhere", "torch stays out of CI; the fixtures it "
                                      "made are committed (tests/fixtures/)"),
    "/tmp/torchref/bin/pip install torch numpy==2.4.6": ("elsewhere", "as above"),
    "pip install torch": ("elsewhere", "reading .pt files; tests/test_convert_torch.py covers "
                          "the torch-free formats and the refusal without torch"),
    "python tests/fixtures/make_torch_reference.py AR_AT_DIR --trades=TRADES_DIR "
    "--mart=MART_DIR": ("elsewhere", "needs torch and the official repositories; its output "
                        "is the committed fixture tests/test_torch_equivalence.py reads"),
    "python -m pytest -s tests/test_torch_equivalence.py": ("elsewhere", "a test file of this "
                                                            "suite, run by CI"),
    "python -m pytest -s tests/test_attacks_equivalence.py -k skips": (
        "elsewhere", "a test of this suite (test_benchmarks_pytest_command_selects_a_test)"),
    "python -m keras_arat.convert_torch --checkpoint=last.safetensors --model=resnet18 "
    "--num_classes=10 --workdir=runs/arat_official": (
        "elsewhere", "tests/test_convert_torch.py runs it on a checkpoint written from the "
        "official code's seeded weights (the published file is not downloadable here)"),
    "python -m export --workdir=runs/arat_official --out=exports/arat_official": (
        "elsewhere", "tests/test_convert_torch.py exports the converted run the same way"),
    # BENCHMARKS.md's evaluation throughput: tests/test_eval_throughput.py runs the same
    # commands on test-size models and budgets.
    "python benchmarks/eval_throughput.py --saved_model=exports/quickstart/saved_model/"
    "quickstart/1 --eps=0.25 --n_examples=200 --attacks=autoattack": (
        "elsewhere", "tests/test_eval_throughput.py::test_saved_model"),
    "python benchmarks/eval_throughput.py --saved_model=exports/quickstart/saved_model/"
    "quickstart/1 --eps=0.25 --n_examples=200 --attacks=pgd20,cw": (
        "elsewhere", "tests/test_eval_throughput.py::test_saved_model"),
    "python benchmarks/eval_throughput.py --saved_model=exports/quickstart/saved_model/"
    "quickstart/1 --eps=0.25 --n_examples=200 --attacks=autoattack --n_iter=10": (
        "elsewhere", "tests/test_eval_throughput.py::test_saved_model (with --n_iter)"),
    "python benchmarks/eval_throughput.py --saved_model=exports/quickstart/saved_model/"
    "quickstart/1 --eps=0.25 --n_examples=1000 --batch_size=1000 --attacks=autoattack": (
        "elsewhere", "tests/test_eval_throughput.py::test_saved_model"),
    "python benchmarks/eval_throughput.py --saved_model=exports/quickstart/saved_model/"
    "quickstart/1 --eps=0.25 --n_examples=1000 --batch_size=1000 --attacks=autoattack "
    "--n_iter=10": ("elsewhere", "tests/test_eval_throughput.py::test_saved_model"),
    "python benchmarks/eval_throughput.py --saved_model=exports/quickstart/saved_model/"
    "quickstart/1 --eps=0.25 --n_examples=200 --attacks=autoattack --n_iter=10 "
    "--square_rescale_schedule": (
        "elsewhere", "tests/test_eval_throughput.py::test_saved_model (with "
        "--square_rescale_schedule) and ::test_square_rescale_schedule_reaches_square"),
    "python benchmarks/eval_throughput.py --saved_model=exports/quickstart/saved_model/"
    "quickstart/1 --eps=0.25 --n_examples=1000 --batch_size=1000 --attacks=autoattack "
    "--n_iter=10 --square_rescale_schedule": (
        "elsewhere", "tests/test_eval_throughput.py::test_saved_model (with "
        "--square_rescale_schedule) and ::test_square_rescale_schedule_reaches_square"),
    "python benchmarks/eval_throughput.py --model=resnet18 --eps=0.0001 --n_examples=2 "
    "--batch_size=2 --n_iter=10 --n_queries=200 --attacks=autoattack": (
        "elsewhere", "tests/test_eval_throughput.py::test_random_weight_model"),
    "python benchmarks/eval_throughput.py --model=resnet18 --eps=0.0001 --n_examples=2 "
    "--batch_size=2 --n_iter=10 --n_queries=200 --attacks=autoattack --query_onnx=convert": (
        "elsewhere", "tests/test_eval_throughput.py::test_random_weight_model (with "
        "--query_onnx=convert)"),
    "python -m pytest -s -q tests/test_distribute.py -k two_logical": (
        "elsewhere", "a test of this suite (test_benchmarks_pytest_command_selects_a_test)"),
}


def parts(command):
    return [p.strip() for p in command.text.split(" && ")]


def documented():
    return docs.documented_commands()


def runnable(text):
    """A usage line without its [optional] parts."""
    return re.sub(r"\s*\[--[^\]]*\]", "", text).strip()


# --------------------------------------------------------------------------- fast checks

def test_every_documented_command_is_covered():
    texts = {p for c in documented() for p in parts(c)}
    missing = sorted(t for t in texts if t not in COVERAGE)
    assert not missing, ("documented commands no test covers (add them to COVERAGE in "
                         f"tests/test_docs.py): {missing}")
    stale = sorted(t for t in COVERAGE if t not in texts)
    assert not stale, f"COVERAGE lists commands no document has any more: {stale}"
    # Each document's Python snippets are run by test_documented_commands_run.
    # README.md's "Your own model" block runs in tests/test_readme_own_model.py.
    assert [s.doc for s in docs.documented_snippets()] == ["README.md", "BUILD.md", "BUILD.md"]


def test_the_parser_reads_continued_lines_and_drops_comments(tmp_path):
    (tmp_path / "X.md").write_text(
        "Text `python -m a --b=1` and `pip install x`.\n\n"
        "    python -m train --f=1 \\\n        --g=2   # a comment\n\n"
        "    not a command\n\n```\nimport os\nprint(os)\n```\n")
    commands = docs.documented_commands(["X.md"], str(tmp_path))
    assert [c.text for c in commands] == ["python -m train --f=1 --g=2", "python -m a --b=1",
                                          "pip install x"]
    assert [s.text for s in docs.documented_snippets(["X.md"], str(tmp_path))] == [
        "import os\nprint(os)"]


def defined_flags(source):
    with open(os.path.join(ROOT, source)) as f:
        return set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", f.read()))


def test_synopses_name_real_flags():
    for text, (how, source) in COVERAGE.items():
        if how != "synopsis":
            continue
        named = set(re.findall(r"--(\w+)", text))
        assert named <= defined_flags(source), (text, named - defined_flags(source))
    assert "tensorboard_every_steps" in defined_flags("keras_arat/train_flags.py")


def test_requirements_are_installed_as_pinned():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pins = dict(line.split("==") for line in f.read().splitlines()
                    if line.strip() and not line.startswith("#"))
    for name, version in pins.items():
        assert metadata.version(name) == version, name
    cuda = "pip install -r requirements.txt 'tensorflow[and-cuda]==2.21.0'"
    assert cuda in COVERAGE and cuda.endswith(f"=={pins['tensorflow']}'")


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        steps = [line for line in f.read().splitlines() if line.startswith("python ")]
    assert os.access(os.path.join(ROOT, ".ci", "run"), os.X_OK)
    assert steps[-2:] == ["python -m ruff check .", "python -m pytest -q -n 2 tests"]
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "pip install -r requirements.txt && python -m pytest -q -n 2 tests" in f.read()


def test_lint_command_passes():
    assert "python -m ruff check ." in COVERAGE
    proc = cli.run_command([sys.executable, "-m", "ruff", "check", "."], timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]


@pytest.mark.slow
def test_fast_tier_leaves_out_the_slow_tests():
    fast = cli.run_command([sys.executable, "-m", "pytest", "-q", "--collect-only", "-m",
                            "not slow", "tests"], timeout=600)
    assert fast.returncode == 0, fast.stdout[-3000:]
    selected, deselected = map(int, re.search(r"(\d+)/\d+ tests collected \((\d+) deselected",
                                              fast.stdout).groups())
    assert selected > 50 and deselected > 20
    assert "test_docs.py::test_readme_and_build_commands_run" not in fast.stdout


def test_benchmarks_pytest_command_selects_a_test():
    for name, key in (("test_distribute.py", "two_logical"),
                      ("test_attacks_equivalence.py", "skips")):
        with open(os.path.join(ROOT, "tests", name)) as f:
            assert re.search(rf"^def test_\w*{key}\w*\(", f.read(), re.M), (name, key)


# ----------------------------------------------------------------- running the commands

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A fresh working folder: what a clone has, without runs/ or exports/."""
    folder = tmp_path_factory.mktemp("clone")
    for name in ("configs", "benchmarks"):
        os.symlink(os.path.join(ROOT, name), folder / name)
    ports = {"8500": str(free_port()), "8501": str(free_port())}
    return folder, ports


def argv_of(text, extra, ports):
    text = runnable(text)
    for documented_port, port in ports.items():
        text = text.replace(documented_port, port)
    argv = shlex.split(text)
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv + list(extra)


def run_documented(workspace, text, extra=None, timeout=900, env=None, ours=True):
    """Run a documented command as COVERAGE says; check exit 0 and, for our commands
    (ours), a quiet start."""
    folder, ports = workspace
    how, detail = COVERAGE[text]
    assert how == "run", text
    extra = detail if extra is None else extra
    proc = cli.run_command(argv_of(text, extra, ports), timeout=timeout, cwd=str(folder),
                           env={"PYTHONPATH": ROOT, **(env or {})})
    assert proc.returncode == 0, (text, proc.stderr[-3000:])
    noise = [line for line in proc.stderr.splitlines() if quiet.is_noise(line)]
    assert not (ours and noise), (text, noise)
    return proc


@pytest.fixture(scope="module")
def quickstart(workspace):
    """README's main job at test size: runs/quickstart in the workspace."""
    proc = run_documented(workspace, QUICKSTART)
    return proc


@pytest.mark.slow
def test_quickstart_prints_a_start_line_progress_and_its_results_once(quickstart, workspace):
    proc = quickstart
    out = proc.stdout.splitlines()
    assert out[0].startswith("training arat in ") and out[0].endswith(
        "runs/quickstart: data digits (256 train / 64 test images, 32x32x3, 10 classes), "
        "model small_cnn (split BN), 2 epochs of 4 steps (batch 64), eps 0.25")
    results = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:])
    assert results == json.load(open(workspace[0] / "runs" / "quickstart" / "results.json"))
    # The results once: one JSON, each figure under one key (the times apart), and the
    # log lines say what runs, not what it measured.
    assert out.count("{") == 1 and proc.stdout.count('"clean_acc"') == 1
    assert "per_branch" not in results
    assert results["time_s"]["adv"].keys() == {"clean", "pgd20"}
    # stderr: progress lines of training (every 10 s, so none when its steps are fast),
    # the final evaluation's line, then PGD-20's progress.
    err = proc.stderr.splitlines()
    final = ("final evaluation on the first 64 test images, eps 0.25: clean and PGD-20 "
             "accuracy of the adv branch, clean accuracy of the clean branch")
    assert err.count(final) == 1, err
    at = err.index(final)
    assert all(re.match(r"^epoch \d/2: \d/4 steps, ", line) for line in err[:at]), err
    assert all(re.match(r"^pgd20: \d+/64 images", line) for line in err[at + 1:]), err
    assert re.match(r"^pgd20: 64/64 images in \d+ s$", err[-1]), err


@pytest.mark.slow
def test_readme_and_build_commands_run(quickstart, workspace):
    folder, ports = workspace
    help_text = run_documented(workspace, "python -m keras_arat.train --helpfull").stdout
    assert "--tensorboard_every_steps" in help_text and "DESIGN.md" not in help_text
    gpus = run_documented(workspace, 'python -c "import tensorflow as tf; '
                                     'print(tf.config.list_physical_devices(\'GPU\'))"',
                          ours=False)  # TensorFlow's own start-up log is its own
    assert gpus.stdout.startswith("[")
    for text in ("python -m keras_arat.evaluate --workdir=runs/quickstart "
                 "--attacks=clean,pgd20,cw,autoattack --branch=both --n_examples=1000",
                 "python -m keras_arat.evaluate --workdir=runs/cifar10_resnet18_arat "
                 "--branch=both --attacks=clean,pgd20,cw"):
        if "cifar10_resnet18" in text:  # the same evaluation, of the test-size run
            text_run = text.replace("runs/cifar10_resnet18_arat", "runs/quickstart")
            COVERAGE[text_run] = COVERAGE[text]
            proc = run_documented(workspace, text_run)
            del COVERAGE[text_run]
        else:
            proc = run_documented(workspace, text)
        evaluated = json.loads(proc.stdout)["evaluated"]
        assert [e["branch"] for e in evaluated] == ["adv", "clean"]
    assert os.path.isfile(folder / "runs" / "quickstart" / "robustbench.json")
    assert not os.path.exists(folder / "exports")  # the export makes its parent folder
    run_documented(workspace, "python -m export --workdir=runs/quickstart "
                              "--out=exports/quickstart [--branch=adv|clean]")
    assert os.path.isdir(folder / "exports" / "quickstart" / "saved_model" / "quickstart" / "1")
    run_documented(workspace, "python benchmarks/export_latency.py --workdir=runs/quickstart")

    server = cli.start_command(argv_of(STANDIN, [], ports), cwd=str(folder),
                               env={"PYTHONPATH": ROOT})
    try:
        line = {}
        reader = threading.Thread(
            target=lambda: line.update(json.loads(server.stdout.readline() or "{}")))
        reader.start()
        reader.join(timeout=300)
        assert line.get("rest"), "the stand-in did not start"
        assert line["rest"] == f"http://127.0.0.1:{ports['8501']}"
        assert line["grpc"] == f"127.0.0.1:{ports['8500']}"
        answer = json.loads(run_documented(workspace, CLIENT).stdout)
        # The served model answers as the exported ONNX file does, on the run's 8 images.
        import onnxruntime as ort

        from keras_arat.data import load_dataset
        digits = load_dataset("digits", n_train=1, n_test=8)
        onnx = ort.InferenceSession(str(folder / "exports" / "quickstart" / "model.onnx"),
                                    providers=["CPUExecutionProvider"])
        want = onnx.run(["logits"], {"images": digits.x_test.astype(np.float32) / 255})[0]
        np.testing.assert_allclose(answer["logits"], want, atol=1e-4, rtol=0)
        assert answer["labels"] == digits.y_test.tolist()
        status = json.loads(run_documented(
            workspace, "curl http://localhost:8501/v1/models/quickstart").stdout)
        assert status["model_version_status"][0]["state"] == "AVAILABLE"
        metadata_doc = json.loads(run_documented(
            workspace, "curl http://localhost:8501/v1/models/quickstart/metadata").stdout)
        assert "serving_default" in json.dumps(metadata_doc)
        image = json.dumps([[[[0.0, 0.0, 0.0]] * 32] * 32])  # what the ... stands for
        body = CURL_PREDICT.replace("[[[[0.0, 0.0, 0.0], ...]]]", image)
        COVERAGE[body] = ("run", [])
        try:
            predictions = json.loads(run_documented(workspace, body).stdout)["predictions"]
        finally:
            del COVERAGE[body]
        assert np.asarray(predictions).shape == (1, 10)
        for snippet in docs.documented_snippets():
            if snippet.doc != "BUILD.md":  # README.md's: tests/test_readme_own_model.py
                continue
            code = snippet.text
            for documented_port, port in ports.items():
                code = code.replace(documented_port, port)
            proc = cli.run_command([sys.executable, "-c", code], cwd=str(folder),
                                   env={"PYTHONPATH": ROOT})
            assert proc.returncode == 0, (snippet, proc.stderr[-3000:])
            assert proc.stderr == ""  # quiet, TensorFlow's start-up log included
            assert re.match(r"^\[( *\d)+\] \[( *\d)+\]$", proc.stdout.strip()), proc.stdout
    finally:
        server.terminate()
        stderr = server.communicate(timeout=30)[1]
    assert stderr == ""


@pytest.mark.slow
def test_benchmarks_commands_run(workspace):
    folder, _ = workspace
    proc = run_documented(workspace, QUICKSTART_BENCH)
    assert "PASS  adv-branch clean acc" in proc.stdout
    run_documented(workspace, "python benchmarks/export_latency.py "
                              "--workdir=runs/quickstart_bench")
    # BENCHMARKS.md's eval_throughput commands: tests/test_eval_throughput.py.
    # The step-time commands on the test-size model; those that differ only in model,
    # batch and steps are then the same command and run once.
    done = set()
    for text, (how, extra) in COVERAGE.items():
        if not text.startswith(STEP_TIME):
            continue
        argv = tuple(argv_of(text, extra, {}))
        effective = {a.split("=")[0]: a for a in argv[2:]}
        key = tuple(sorted(effective.values()))
        if key in done:
            continue
        done.add(key)
        proc = run_documented(workspace, text)
        assert "ratio arat/pgd_at" in proc.stdout or "--methods=pgd_at,arat" not in text
    assert len(done) == 5


@pytest.mark.slow
def test_experiment_grid_commands_run(workspace):
    folder, _ = workspace
    for text, grid in (("python -m keras_arat.experiments "
                        "--flagfile=configs/tradeoff_quickstart.flags --workdir=runs/tradeoff",
                        "tradeoff"),
                       ("python -m keras_arat.experiments "
                        "--flagfile=configs/tradeoff_cifar.flags --workdir=runs/tradeoff_cifar",
                        "tradeoff_cifar"),
                       ("python -m keras_arat.experiments "
                        "--flagfile=configs/ablation_quickstart.flags --workdir=runs/ablation",
                        "ablation")):
        run_documented(workspace, text)
        state = json.load(open(folder / "runs" / grid / "grid.json"))
        assert state["cells"]["arat/seed_0"]["status"] == "done"


def command_and_tf_config(text):
    """(the train flags, TF_CONFIG) of a documented train command."""
    words = shlex.split(runnable(text))
    env = dict(w.split("=", 1) for w in words[:words.index("python")])
    if "--strategy=multi_worker" in words and "TF_CONFIG" not in env:  # set by `export`
        env["TF_CONFIG"] = shlex.split(f"export TF_CONFIG={TF_CONFIG_TWO_HOSTS}")[1][10:]
    return words[words.index("python") + 3:], env.get("TF_CONFIG")


@pytest.mark.slow
def test_gpu_and_cluster_commands_validate(workspace):
    folder, _ = workspace
    commands = [(*command_and_tf_config(text), expected) for text, expected in GPU_TRAIN.items()]
    proc = cli.run_command([sys.executable, "-c", VALIDATE_SCRIPT, json.dumps(commands)],
                           cwd=str(folder), env={"PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(GPU_TRAIN) == 8
    for (args, tf_config, expected), result in zip(commands, results):
        assert result.get("error") is None, (args, result)
        assert (result["dataset"], result["model"], result["method"]) == tuple(expected), args
        assert (tf_config is not None) == (result["strategy"] == "multi_worker")


# One process parses every GPU command as keras_arat.train would (flagfile lookup, absl
# flags, config checks, model name, TF_CONFIG) and prints what each resolved to.
VALIDATE_SCRIPT = """
import json, os, sys
from absl import flags
from keras_arat import config, errors, runs, train, train_flags
out = []
for args, tf_config, _ in json.loads(sys.argv[1]):
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(train_flags.resolve_flagfiles(["train", *args]))
        cfg = config.config_from_flags(flags.FLAGS, train.TRAIN_FLAGS)
        if cfg.strategy == "multi_worker":
            os.environ["TF_CONFIG"] = tf_config
            train.check_tf_config()
        out.append({k: getattr(cfg, k) for k in ("dataset", "model", "method", "strategy")})
    except (flags.Error, errors.UsageError) as e:
        out.append({"error": str(e)})
print(json.dumps(out))
"""
