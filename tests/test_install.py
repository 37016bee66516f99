"""pip install . and pip install -e .: the package, its flagfiles and data, and no
top-level `export` package in site-packages. Offline: the build uses this environment's
setuptools (--no-build-isolation) and installs no dependencies (--no-deps)."""

import glob
import os
import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.slow  # end to end: subprocesses, training, export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH="")


def pip(*args, cwd=ROOT):
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps",
                           "--no-build-isolation", "--no-index", "-q"],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def python(code, site_dir, cwd, *args):
    """Run python from `cwd` (not the checkout) with `site_dir` as a site directory."""
    prelude = f"import site, sys; sys.path = [p for p in sys.path if p != {ROOT!r}]; " \
              f"site.addsitedir({site_dir!r}); "
    return subprocess.run([sys.executable, "-c", prelude + code, *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_wheel_holds_the_package_its_flagfiles_and_data(tmp_path):
    pip("wheel", "-w", str(tmp_path / "dist"), ".")
    (wheel,) = glob.glob(str(tmp_path / "dist" / "keras_arat-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("export/")]  # no top-level `export`
    for expected in ("keras_arat/export/cli.py", "keras_arat/export/fold.py",
                     "keras_arat/export/client.py", "keras_arat/configs/quickstart.flags",
                     "keras_arat/configs/cifar.flags", "keras_arat/data/digits_5k.npz",
                     "keras_arat/network.py"):
        assert expected in names, expected
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("keras-arat-train", "keras-arat-evaluate", "keras-arat-export"):
        assert script in entry_points

    site_dir = str(tmp_path / "site")
    pip("install", "--target", site_dir, wheel)
    away = tmp_path / "elsewhere"
    away.mkdir()
    proc = python("import keras_arat, keras_arat.train_flags as tf_, keras_arat.export.fold as f; "
                  "print(keras_arat.__file__); print(tf_.CONFIGS_DIR); print(f.__file__)",
                  site_dir, str(away))
    assert proc.returncode == 0, proc.stderr[-2000:]
    package, configs, fold = proc.stdout.split()
    assert package.startswith(site_dir) and fold.startswith(site_dir)
    assert configs == os.path.join(site_dir, "keras_arat", "configs")
    # A bare flagfile name resolves to the installed configs/: the flags parse, and the
    # trainer stops at the (deliberately) bad value after them.
    proc = python("import runpy; sys.argv = ['train'] + sys.argv[1:]; "
                  "runpy.run_module('keras_arat.train', run_name='__main__')",
                  site_dir, str(away), "--flagfile=quickstart.flags", "--epochs=0")
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and errors == ["error: --epochs must be >= 1, got 0"], \
        proc.stderr[-2000:]
    # keras-arat-evaluate, as its console script calls it: a path error is one line,
    # found before TensorFlow loads.
    (line,) = [ln for ln in entry_points.splitlines() if ln.startswith("keras-arat-evaluate")]
    module, function = line.split("=")[1].strip().split(":")
    proc = python(f"sys.argv = ['keras-arat-evaluate'] + sys.argv[1:]\n"
                  f"from {module} import {function}\n"
                  f"try:\n    {function}()\n"
                  f"except SystemExit as e:\n    print(e.code, 'tensorflow' in sys.modules)",
                  site_dir, str(away), f"--workdir={wheel}")
    assert proc.stdout.split() == ["2", "False"], (proc.stdout, proc.stderr[-2000:])
    assert proc.stderr.splitlines() == [f"error: --workdir={wheel} is not a folder: give a "
                                        "training run's folder (the --workdir of "
                                        "keras_arat.train)"]
    # The export command ships inside the package: python -m keras_arat.export.
    proc = python("import runpy; sys.argv = ['export'] + sys.argv[1:]; "
                  "runpy.run_module('keras_arat.export', run_name='__main__')",
                  site_dir, str(away), "--out=exports/x")
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and errors == ["error: --workdir (or --keras_model) is "
                                               "required"], proc.stderr[-2000:]


def test_editable_install_imports_from_any_folder(tmp_path):
    prefix = tmp_path / "prefix"
    pip("install", "-e", ".", "--prefix", str(prefix))
    (site_dir,) = glob.glob(str(prefix / "lib" / "python*" / "site-packages"))
    proc = python("import importlib.util, keras_arat, keras_arat.train_flags as tf_; "
                  "print(keras_arat.__file__); print(tf_.CONFIGS_DIR); "
                  "print(importlib.util.find_spec('keras_arat.export').submodule_search_locations[0])",
                  site_dir, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    package, configs, export = proc.stdout.split()
    assert package == os.path.join(ROOT, "keras_arat", "__init__.py")
    assert configs == os.path.join(ROOT, "configs")
    assert export == os.path.join(ROOT, "export")
    for script in ("keras-arat-train", "keras-arat-evaluate", "keras-arat-export",
                   "keras-arat-experiments", "keras-arat-convert-torch"):
        assert os.path.exists(prefix / "bin" / script), script
