"""RunConfig: the typed settings of a run, built from keras_arat.train's flags and read back
from config.json."""

import dataclasses
import json
import os

import pytest

from keras_arat import config, errors, runs, train_flags
from keras_arat.config import RunConfig


def from_argv(*args):
    values, names = train_flags.train_flag_values(["train", *args])
    return config.config_from_flags(values, names)


def test_every_train_flag_is_a_setting_with_the_flags_default(tmp_path):
    cfg = from_argv(f"--workdir={tmp_path}")
    _, names = train_flags.train_flag_values()
    assert set(names) <= set(RunConfig.names())
    # Flags at their defaults give RunConfig's defaults (eps "8/255" parsed, lists as
    # tuples), so a config.json written before a setting existed reads as that run was.
    assert cfg == RunConfig(workdir=str(tmp_path))
    assert cfg.eps == 8 / 255 and cfg.lr_values == (0.02, 0.1, 0.01, 0.001)


def test_frozen_and_replace(tmp_path):
    cfg = from_argv(f"--workdir={tmp_path}", "--method=pgd_at", "--eps=0.25")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.eps = 0.5
    assert cfg.split_bn is False  # the baselines are single-BN networks
    changed = cfg.replace(epochs=3)
    assert (changed.epochs, cfg.epochs, changed.eps) == (3, 100, 0.25)


def test_config_json_round_trip_and_older_files(tmp_path):
    cfg = from_argv(f"--workdir={tmp_path}", "--lr_values=0.1,0.01", "--lr_boundaries=3")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg.to_dict(), f)
    assert config.read_config(str(tmp_path)) == cfg
    # An older run's file: a setting missing (its default is read), an unknown key ignored.
    old = cfg.to_dict()
    del old["attack_bn"]
    old["a_setting_since_removed"] = 1
    with open(tmp_path / "config.json", "w") as f:
        json.dump(old, f)
    read = config.read_config(str(tmp_path))
    assert read.attack_bn == "default" and read.lr_boundaries == (3,)


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "does not hold a run's settings"),
    ("{not json", "is not valid JSON"),
])
def test_bad_config_json_is_one_usage_error(tmp_path, content, message):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(errors.UsageError, match=message):
        config.read_config(str(tmp_path))
    with pytest.raises(errors.UsageError, match="not found"):
        config.read_config(os.path.join(str(tmp_path), "absent"))


def test_names_that_left_runs_still_resolve_with_a_deprecation_warning():
    """runs.py kept only the building of a run: the flags, the settings and results.json
    moved to train_flags, config and results; the old names resolve to the same objects."""
    import warnings

    from keras_arat import results
    for old, new in (("parse_flags", train_flags.parse_flags),
                     ("config_from_flags", config.config_from_flags),
                     ("update_results", results.update_results)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert getattr(runs, old) is new
        assert [w.category for w in caught] == [DeprecationWarning]
        assert new.__module__.split(".")[-1] in str(caught[0].message)
    with pytest.raises(AttributeError):
        runs.no_such_name  # noqa: B018
