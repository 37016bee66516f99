"""Progress lines for logs and the quiet TensorFlow start-up (no training)."""

import io
import os

import pytest

from keras_arat import progress, quiet
from tests.cli import run_cli


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_in_a_log_is_whole_lines_with_eta():
    clock, out = Clock(), io.StringIO()  # StringIO is not a terminal: a log
    bar = progress.Progress(1000, "pgd20", stream=out, interval=10, clock=clock)
    for _ in range(10):  # 100 images every 4 s: a line at most every 10 s
        clock.now += 4
        bar.update(100)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # Lines at 12 s (300 done), 24 s (600), 36 s (900); then the final one.
    assert lines == ["pgd20: 300/1000 images, 12 s, ETA 28 s",
                     "pgd20: 600/1000 images, 24 s, ETA 16 s",
                     "pgd20: 900/1000 images, 36 s, ETA 4 s",
                     "pgd20: 1000/1000 images in 40 s"]


def test_progress_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv(progress.ENV_SECONDS, "0")
    clock, out = Clock(), io.StringIO()
    bar = progress.Progress(3, "epoch 1/2", "steps", stream=out, clock=clock)
    for _ in range(3):
        clock.now += 65
        bar.update()
    bar.close(line=False)  # the caller prints its own last line
    assert out.getvalue().splitlines() == ["epoch 1/2: 1/3 steps, 1 min 05 s, ETA 2 min 10 s",
                                           "epoch 1/2: 2/3 steps, 2 min 10 s, ETA 1 min 05 s"]


def test_durations():
    assert [progress.duration(s) for s in (0, 59.4, 60, 3599, 3600, 7325)] == [
        "0 s", "59 s", "1 min 00 s", "59 min 59 s", "1 h 00 min", "2 h 02 min"]


def test_start_up_noise_is_dropped_and_other_lines_kept(capfd):
    lines = [  # TensorFlow 2.21's start-up on a CPU-only machine, as measured here
        "WARNING: All log messages before absl::InitializeLog() is called are written to "
        "STDERR",
        "I0000 00:00:1796171637.729113   15820 cudart_stub.cc:31] Could not find cuda "
        "drivers on your machine, GPU will not be used.",
        "I0000 00:00:1796171637.964043   15820 cpu_feature_guard.cc:227] This TensorFlow "
        "binary is optimized to use available CPU instructions in performance-critical "
        "operations.",
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild "
        "TensorFlow with the appropriate compiler flags.",
        "E0000 00:00:1796171652.976770   15820 cuda_platform.cc:52] failed call to cuInit: "
        "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
        "E0000 00:00:1796171652.976770   15820 some_kernel.cc:12] a real error",
        "a warning of ours"]
    with quiet.filtered_stderr():
        os.write(2, ("\n".join(lines) + "\n").encode())  # as C++ writes: to the descriptor
    assert capfd.readouterr().err.splitlines() == lines[-2:]


@pytest.mark.slow
def test_verbose_brings_the_start_up_log_back(tmp_path):
    code = "from keras_arat import quiet; quiet.import_tensorflow(); print('imported')"
    quiet_run = run_cli("-c", code, timeout=300)
    loud_run = run_cli("-c", code, timeout=300, env={quiet.ENV_VERBOSE: "1"})
    assert quiet_run.stdout == loud_run.stdout == "imported\n"
    assert quiet_run.stderr == ""
    assert any(quiet.is_noise(line) for line in loud_run.stderr.splitlines()), loud_run.stderr
