"""robustbench.json follows RobustBench's model_info format for the Linf and L2 leaderboards.

The field lists below are copied from RobustBench's repository (github.com/RobustBench/
robustbench, commit 78fcc9e): every key of its model_info/<dataset>/<Linf|L2>/*.json
files (188 files), the keys all of them have, and the types they hold. Their leaderboard
code reads float(clean_acc) / 100 and float(autoattack_acc) / 100, shows venue "" as
"Unpublished", and keeps eps as written ("8/255", "4/255", "0.5", "0.031").
"""

import re

import pytest

from keras_arat import robustbench
from keras_arat.config import RunConfig
from keras_arat.evaluation import robustbench_entry

THEIR_FIELDS = {"link", "name", "authors", "additional_data", "number_forward_passes",
                "dataset", "venue", "architecture", "eps", "clean_acc", "reported",
                "autoattack_acc", "unreliable", "footnote", "external"}
THEIR_REQUIRED = {"additional_data", "architecture", "authors", "autoattack_acc", "clean_acc",
                  "dataset", "eps", "link", "name", "number_forward_passes", "reported",
                  "venue"}
STRING_FIELDS = {"link", "name", "authors", "dataset", "venue", "architecture", "eps",
                 "clean_acc", "reported", "autoattack_acc", "footnote", "external"}
PERCENT = re.compile(r"^\d{1,3}(\.\d{1,2})?$")  # their files: "94.78", "71.6", "0.0"
EPS = re.compile(r"^(\d+/255|\d*\.\d+)$")


def check_model_info(entry):
    """Assert that `entry` reads as one of RobustBench's model_info files."""
    assert THEIR_REQUIRED <= set(entry) <= THEIR_FIELDS, set(entry) ^ THEIR_REQUIRED
    for key in STRING_FIELDS & set(entry):
        assert isinstance(entry[key], str), key
    for key in ("clean_acc", "reported", "autoattack_acc"):
        assert PERCENT.match(entry[key]), (key, entry[key])
        assert 0.0 <= float(entry[key]) / 100 <= 1.0
    assert EPS.match(entry["eps"]), entry["eps"]
    assert type(entry["number_forward_passes"]) is int and entry["number_forward_passes"] >= 1
    assert type(entry["additional_data"]) is bool
    assert type(entry.get("unreliable", False)) is bool


def test_their_own_files_pass_the_check():
    # model_info/cifar10/Linf/Standard.json, as in their repository.
    check_model_info({
        "link": "https://github.com/RobustBench/robustbench/", "name": "Standardly trained "
        "model", "authors": "", "additional_data": False, "number_forward_passes": 1,
        "dataset": "cifar10", "venue": "N/A", "architecture": "WideResNet-28-10",
        "eps": "8/255", "clean_acc": "94.78", "reported": "0.0", "autoattack_acc": "0.0"})
    with pytest.raises(AssertionError):  # a fraction instead of a percent string
        check_model_info({
            "link": "", "name": "x", "authors": "", "additional_data": False,
            "number_forward_passes": 1, "dataset": "cifar10", "venue": "",
            "architecture": "ResNet-18", "eps": 8 / 255, "clean_acc": 0.8571,
            "reported": "52.50", "autoattack_acc": "52.48", "unreliable": False})


def test_entry_of_an_evaluation():
    accs = {"clean": 0.8534, "clean_time_s": 1.0, "pgd20": 0.55, "pgd20_time_s": 3.0,
            "autoattack": 0.5248, "autoattack_time_s": 30.0}
    details = {"autoattack": {"clean_acc": 0.8534}, "warnings": []}
    arch = robustbench.architecture(RunConfig(model="resnet18"))
    entry = robustbench_entry(accs, details, 8 / 255, 1000, arch, "arat", "cifar10")
    check_model_info(entry)
    assert set(entry) == set(robustbench.FIELDS) and entry["footnote"]
    assert entry["clean_acc"] == "85.34" and entry["autoattack_acc"] == "52.48"
    assert entry["reported"] == "52.48" and entry["eps"] == "8/255"
    assert entry["architecture"] == "ResNet-18" and entry["dataset"] == "cifar10"
    assert entry["name"] == "ARAT (ResNet-18), trained with keras_arat"
    assert entry["unreliable"] is False and "first 1000 test images" in entry["footnote"]
    # The figure is AutoAttack's alone: the PGD-20 that ran beside it is not in it.
    assert "none of the four stages breaks it (no other attack enters this figure)" in \
        entry["footnote"] and "pgd20" not in entry["footnote"]


def test_autoattack_alone_fills_clean_accuracy_from_autoattack():
    accs = {"autoattack": 0.25, "autoattack_time_s": 9.0}  # no clean attack was run
    details = {"autoattack": {"clean_acc": 0.875, "robust_acc": 0.25}, "warnings": [
        "gradient masking suspected: square broke 3 of 8 points"]}
    entry = robustbench_entry(accs, details, 0.25, 8, "SmallCNN-16", "pgd_at", "digits")
    check_model_info(entry)
    assert entry["clean_acc"] == "87.50" and entry["autoattack_acc"] == "25.00"
    assert entry["eps"] == "0.25" and entry["unreliable"] is True
    assert "gradient masking suspected" in entry["footnote"]


@pytest.mark.parametrize("config,text", [
    ({"model": "resnet18"}, "ResNet-18"), ({"model": "preact_resnet18"}, "PreActResNet-18"),
    ({"model": "wrn", "wrn_depth": 34, "wrn_width": 10}, "WideResNet-34-10"),
    ({"model": "wrn", "wrn_depth": 10, "wrn_width": 1}, "WideResNet-10-1"),
    ({"model": "small_cnn", "cnn_width": 16}, "SmallCNN-16")])
def test_architecture_names(config, text):
    assert robustbench.architecture(RunConfig(**config)) == text


@pytest.mark.parametrize("eps,text", [(8 / 255, "8/255"), (4 / 255, "4/255"), (0.5, "0.5"),
                                      (0.25, "0.25"), (0.031, "0.031"), (0.3, "0.3")])
def test_eps_as_robustbench_writes_it(eps, text):
    assert robustbench.eps_text(eps) == text


def test_percent_rounds_to_two_decimals():
    assert [robustbench.percent(a) for a in (0.0, 1.0, 0.85341, 0.85349, 0.5)] == [
        "0.00", "100.00", "85.34", "85.35", "50.00"]
