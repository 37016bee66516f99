"""Running the command lines in a subprocess, as a user does: one helper for every test.

    proc = run_cli("keras_arat.train", "--flagfile=quickstart.flags", ...)  # python -m
    proc = run_cli("benchmarks/quickstart.py", ...)                         # a script
    proc = run_cli("-c", "print(1)")                                        # python -c
    proc.returncode, proc.stdout, proc.stderr, proc.seconds
    assert_error(proc, "must be in (0, 1]")  # exit 2, one `error:` line, nothing else

The child gets this environment minus the variables that change what a command prints
(TF_CPP_MIN_LOG_LEVEL, KERAS_ARAT_VERBOSE, KERAS_ARAT_PROGRESS_SECONDS), so the tests
see the output a user sees; `env` adds or overrides variables.
"""

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT_VARIABLES = ("TF_CPP_MIN_LOG_LEVEL", "KERAS_ARAT_VERBOSE", "KERAS_ARAT_PROGRESS_SECONDS")


def command(module, *args):
    if module == "-c":
        return [sys.executable, "-c", *args]
    if module.endswith(".py"):
        return [sys.executable, module, *args]
    return [sys.executable, "-m", module, *args]


def child_env(env=None):
    out = {k: v for k, v in os.environ.items() if k not in OUTPUT_VARIABLES}
    out["CUDA_VISIBLE_DEVICES"] = "-1"  # tests never use a GPU, even where there is one
    out.update(env or {})
    return out


def run_cli(module, *args, timeout=600, check=False, env=None, cwd=ROOT):
    """Run `module` with `args` to completion; the CompletedProcess gets `.seconds`."""
    return run_command(command(module, *map(str, args)), timeout, check, env, cwd)


def run_command(argv, timeout=600, check=False, env=None, cwd=ROOT):
    """Run any argv (a documented command) the same way."""
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, env=child_env(env), capture_output=True, text=True,
                          timeout=timeout)
    proc.seconds = time.monotonic() - start
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def start_cli(module, *args, env=None, cwd=ROOT, **popen_kwargs):
    """Start `module` in the background (a Popen; stop it with .terminate())."""
    return start_command(command(module, *map(str, args)), env, cwd, **popen_kwargs)


def start_command(argv, env=None, cwd=ROOT, **popen_kwargs):
    popen_kwargs.setdefault("stdout", subprocess.PIPE)
    popen_kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(argv, cwd=cwd, env=child_env(env), text=True, **popen_kwargs)


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def error_lines(proc):
    return [line for line in lines(proc.stderr) if line.startswith("error:")]


def assert_error(proc, message, status=2, alone=True):
    """Exit `status` with exactly one `error:` line holding `message`; with alone, stderr
    holds nothing else (no start-up log, no traceback)."""
    assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
    errors = error_lines(proc)
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if alone:
        assert lines(proc.stderr) == errors, proc.stderr[-3000:]


def without_tensorflow(folder):
    """Environment in which importing TensorFlow fails: a command that reports its error
    under it did not load TensorFlow (nor Keras, tfds, tf2onnx: they all import it)."""
    package = os.path.join(folder, "no_tensorflow", "tensorflow")
    os.makedirs(package, exist_ok=True)
    with open(os.path.join(package, "__init__.py"), "w") as f:
        f.write('raise ImportError("this test forbids importing TensorFlow")\n')
    return {"PYTHONPATH": os.pathsep.join([os.path.dirname(package), ROOT])}
