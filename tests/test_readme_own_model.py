"""README.md's "Your own model" code, run exactly as printed there, in a fresh folder."""

import os
import re

import pytest

from tests.cli import ROOT, run_cli

pytestmark = pytest.mark.slow  # end to end: subprocesses, training, export


def readme_code():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section shows one python block"
    return blocks[0]


def test_readme_own_model_runs_as_printed(tmp_path):
    script = tmp_path / "own_model.py"
    script.write_text(readme_code())
    proc = run_cli(str(script), cwd=str(tmp_path), env={"PYTHONPATH": ROOT}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    validation, accuracy, diffs = (eval(line) for line in lines[-3:])  # the printed dicts
    print(proc.stdout[-2000:])
    # The best checkpoint by val_pgd_acc, reloaded, evaluated on the test images.
    assert (tmp_path / "best.keras").exists()
    assert set(validation) == {"loss", "clean_acc", "pgd_acc", "clean_acc_clean_branch"}
    assert 1.0 >= validation["clean_acc"] >= validation["pgd_acc"] >= 0.0
    # Accuracies are fractions of the 40 test images: each attack alone, and the worst
    # case over both.
    assert set(accuracy) == {"clean", "pgd20", "autoattack", "worst_case"}
    assert accuracy["clean"] == pytest.approx(validation["clean_acc"])  # the same model
    assert 1.0 >= accuracy["clean"] >= max(accuracy["pgd20"], accuracy["autoattack"])
    assert min(accuracy["pgd20"], accuracy["autoattack"]) >= accuracy["worst_case"] >= 0.0
    assert accuracy["clean"] >= 0.75 and accuracy["pgd20"] >= 0.2  # it learned, robustly
    for value in accuracy.values():
        assert abs(value * 40 - round(value * 40)) < 1e-9
    # The folded model, the SavedModel and onnxruntime agree with the split-BN network.
    assert set(diffs) >= {"folded_keras", "saved_model", "onnxruntime", "keras_file"}
    assert max(diffs.values()) <= 1e-4
    out = tmp_path / "exports" / "my_model"
    assert (out / "saved_model" / "model" / "1" / "saved_model.pb").exists()
    assert (out / "model.onnx").exists()
