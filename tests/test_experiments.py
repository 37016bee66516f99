"""The experiment grid end to end: cells, table, plot, skip on re-run, failures, bad input."""

import csv
import glob
import json
import os
import shutil
import signal
import statistics
import sys
import time

import pytest

from tests import cli
from tests.cli import ROOT, run_cli

pytestmark = pytest.mark.slow  # every test runs the grid runner in a subprocess

TINY = ("dataset=digits,n_train=128,n_test=64,batch_size=64,cnn_width=8,attack_steps=1,"
        "epochs=1,eps=0.3,step_size=0.1,lr_values=0.05,lr_boundaries=,a_prev_examples=64")
ROWS = ["arat:method=arat", "pgd_at:method=pgd_at",
        "broken:method=arat,eps=2"]  # eps=2 passes flag parsing; the trainer rejects it
GRID_ARGS = ["--base_flagfile=configs/quickstart.flags", f"--overrides={TINY}", "--seeds=0,1",
             *[f"--rows={r}" for r in ROWS]]
GOOD = [("arat", 0), ("arat", 1), ("pgd_at", 0), ("pgd_at", 1)]


def run_grid(*args, timeout=400):
    proc = run_cli("keras_arat.experiments", *args, timeout=timeout)
    return proc, proc.seconds


def read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("grid") / "g")
    # Two cells at a time: the runner's --jobs path (the later re-runs use one).
    proc, seconds = run_grid(*GRID_ARGS, f"--workdir={workdir}", "--jobs=2")
    return workdir, proc, seconds


def test_grid_trains_every_cell_and_marks_the_broken_ones_failed(grid):
    workdir, proc, _ = grid
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # some cells failed
    state = json.load(open(os.path.join(workdir, "grid.json")))
    assert state["seeds"] == [0, 1] and [r["name"] for r in state["rows"]] == [
        "arat", "pgd_at", "broken"]
    for row, seed in GOOD:
        cell = state["cells"][f"{row}/seed_{seed}"]
        assert cell["status"] == "done"
        results = json.load(open(os.path.join(workdir, row, f"seed_{seed}", "results.json")))
        assert cell["results"]["clean"] == results["clean_acc"]
        assert cell["results"]["pgd20"] == results["pgd20_acc"]
        config = json.load(open(os.path.join(workdir, row, f"seed_{seed}", "config.json")))
        assert config["seed"] == seed and config["method"] == row
        assert config["n_train"] == 128 and config["epochs"] == 1
    for seed in (0, 1):
        cell = state["cells"][f"broken/seed_{seed}"]
        assert cell["status"] == "failed"
        assert "exit status 2" in cell["error"] and "--eps=2 must be in (0, 1]" in cell["error"]
    log = read(os.path.join(workdir, "experiments.log"))
    assert "[broken/seed_0] FAILED" in log and "--eps=2 must be in (0, 1]" in log
    assert "4 done, 2 failed" in log


def test_table_holds_mean_and_std_over_seeds(grid):
    workdir, _, _ = grid
    with open(os.path.join(workdir, "table.csv")) as f:
        table = {line["row"]: line for line in csv.DictReader(f)}
    assert list(table) == ["arat", "pgd_at", "broken"]
    for row in ("arat", "pgd_at"):
        results = [json.load(open(os.path.join(workdir, row, f"seed_{s}", "results.json")))
                   for s in (0, 1)]
        line = table[row]
        assert line["seeds_converged"] == "2" and line["seeds_total"] == "2"
        assert line["method"] == row and line["recipe"] == "quickstart.flags"
        assert line["n_examples"] == "64"
        for column, values in [
                ("clean", [r["clean_acc"] for r in results]),
                ("pgd20", [r["pgd20_acc"] for r in results]),
                ("clean+pgd20", [r["clean_acc"] + r["pgd20_acc"] for r in results])]:
            assert float(line[f"{column}_mean"]) == pytest.approx(statistics.mean(values))
            assert float(line[f"{column}_std"]) == pytest.approx(statistics.stdev(values))
            assert line[f"{column}_n"] == "2"
        mean = statistics.mean(r["pgd20_acc"] for r in results)
        assert f"{100 * mean:.2f} ± " in read(os.path.join(workdir, "table.md"))
    assert table["broken"]["seeds_converged"] == "0" and table["broken"]["seeds_failed"] == "2"
    assert table["broken"]["clean_mean"] == ""
    md = read(os.path.join(workdir, "table.md"))
    assert ("| Row | Recipe | Method | Overrides | Seeds | Clean | PGD-20 | Clean + PGD-20 |"
            in md)
    assert ("| broken (FAILED) | quickstart.flags | arat | method=arat,eps=2 | 0/2 (2 FAILED) |"
            in md)
    assert "measured on the same first 64 test images" in md  # n_test=64
    assert "| broken | 1 | – | – | FAILED: crashed: exit status 2 |" in md
    assert "- arat vs pgd_at, Clean + PGD-20: " in md


def test_cells_below_the_convergence_rule_are_failed_not_averaged(grid, tmp_path):
    workdir, _, _ = grid
    copy = str(tmp_path / "g")
    shutil.copytree(workdir, copy)
    clean = {(r, s): json.load(open(os.path.join(copy, r, f"seed_{s}", "results.json")))[
        "clean_acc"] for r, s in GOOD}
    low, high = sorted([clean[("arat", 0)], clean[("arat", 1)]])
    if low == high:
        pytest.skip("both arat seeds have the same clean accuracy")
    # A floor between arat's two seeds: the lower seed is FAILED and left out of the mean.
    floor = (low + high) / 2
    proc, _ = run_grid(*GRID_ARGS, f"--workdir={copy}", "--report_only",
                       f"--min_clean_acc={floor}")
    with open(os.path.join(copy, "table.csv")) as f:
        table = {line["row"]: line for line in csv.DictReader(f)}
    assert table["arat"]["seeds_converged"] == "1" and table["arat"]["seeds_failed"] == "1"
    assert float(table["arat"]["clean_mean"]) == pytest.approx(high)
    assert table["arat"]["clean_std"] == ""
    md = read(os.path.join(copy, "table.md"))
    failed_seed = 0 if clean[("arat", 0)] == low else 1
    assert "| arat (FAILED) | quickstart.flags | arat | method=arat | 1/2 (1 FAILED) |" in md
    assert f"FAILED: Clean {low:.3f} < {floor:g}" in md
    assert f"| arat | {failed_seed} |" in md
    assert "- arat vs pgd_at, Clean + PGD-20: not comparable (a seed did not converge)" in md
    assert read(os.path.join(copy, "tradeoff.png"), "rb")[:4] == b"\x89PNG"
    # A floor nobody meets: no row is averaged at all.
    run_grid(*GRID_ARGS, f"--workdir={copy}", "--report_only", "--min_clean_acc=1.0",
             "--min_robust_acc=1.0")
    with open(os.path.join(copy, "table.csv")) as f:
        assert all(line["clean_mean"] == "" for line in csv.DictReader(f))


def test_plot_is_a_png(grid):
    workdir, _, _ = grid
    png = read(os.path.join(workdir, "tradeoff.png"), "rb")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_rerun_skips_finished_cells_and_rewrites_the_same_table(grid):
    workdir, _, first_seconds = grid
    before = {n: read(os.path.join(workdir, n)) for n in ("table.md", "table.csv")}
    mtimes = {(r, s): os.path.getmtime(os.path.join(workdir, r, f"seed_{s}", "results.json"))
              for r, s in GOOD}
    proc, seconds = run_grid(*GRID_ARGS, f"--workdir={workdir}", "--retry_failed=false")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert seconds < first_seconds / 4, (seconds, first_seconds)
    assert proc.stdout.count("finished: skipped") == 4
    assert proc.stdout.count("failed before; skipped") == 2
    for name, text in before.items():
        assert read(os.path.join(workdir, name)) == text
    for (r, s), mtime in mtimes.items():
        assert os.path.getmtime(os.path.join(workdir, r, f"seed_{s}", "results.json")) == mtime


def test_a_stopped_grid_stops_its_running_cells_and_marks_them_interrupted(tmp_path):
    workdir = str(tmp_path / "g")
    overrides = TINY.replace("epochs=1", "epochs=500")  # still training when stopped
    grid = cli.start_command([sys.executable, "-m", "keras_arat.experiments",
                              "--base_flagfile=configs/quickstart.flags",
                              f"--overrides={overrides}", "--seeds=0,1,2",
                              "--rows=arat:method=arat", f"--workdir={workdir}", "--jobs=2"],
                             cwd=ROOT)
    log = os.path.join(workdir, "experiments.log")
    deadline = time.time() + 300
    while time.time() < deadline and not all(  # both cells past their first checkpoint
            glob.glob(os.path.join(workdir, "arat", f"seed_{s}", "checkpoints", "epoch-*"))
            for s in (0, 1)):
        assert grid.poll() is None, grid.communicate()
        time.sleep(0.5)
    assert read(log).count("training: python -m keras_arat.train") == 2  # --jobs=2
    grid.send_signal(signal.SIGTERM)
    stdout, _ = grid.communicate(timeout=60)
    assert grid.returncode == 130, stdout[-3000:]
    cells = json.load(open(os.path.join(workdir, "grid.json")))["cells"]
    assert {k: c["status"] for k, c in cells.items()} == {"arat/seed_0": "interrupted",
                                                          "arat/seed_1": "interrupted"}
    assert "interrupted: re-run the same command to continue" in read(log)
    # The cells' trainers were stopped with it, not left running.
    time.sleep(1)
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = read(f"/proc/{pid}/cmdline", "rb").replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "keras_arat.train" in cmdline and workdir in cmdline:
            left.append(cmdline)
    assert not left, left


def test_partial_cell_is_resumed_and_a_fixed_row_runs(grid, tmp_path):
    """A cell whose run stopped before results.json resumes through the trainer."""
    workdir, _, _ = grid
    copy = str(tmp_path / "g")
    shutil.copytree(workdir, copy)
    state = json.load(open(os.path.join(copy, "grid.json")))
    # Pretend arat/seed_1 was interrupted after its checkpoint but before its evaluation.
    os.remove(os.path.join(copy, "arat", "seed_1", "results.json"))
    state["cells"]["arat/seed_1"]["status"] = "interrupted"
    with open(os.path.join(copy, "grid.json"), "w") as f:
        json.dump(state, f)
    proc, _ = run_grid("--base_flagfile=configs/quickstart.flags", f"--overrides={TINY}",
                       "--seeds=0,1", "--rows=arat:method=arat", f"--workdir={copy}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[arat/seed_0] finished: skipped" in proc.stdout
    assert "[arat/seed_1] training (resuming)" in proc.stdout
    train_log = read(os.path.join(copy, "arat", "seed_1", "train.log"))
    train_err = read(os.path.join(copy, "arat", "seed_1", "train.stderr.log"))
    assert "from epoch 1" in train_log + train_err  # resumed, not retrained
    assert os.path.exists(os.path.join(copy, "arat", "seed_1", "results.json"))
    with open(os.path.join(copy, "table.csv")) as f:
        assert [line["row"] for line in csv.DictReader(f)] == ["arat"]


@pytest.mark.parametrize("args,message", [
    (["--rows=arat-method=arat"], "row 'arat-method=arat' has no ':'"),
    (["--rows=arat:method"], "row arat: 'method' is not key=value"),
    (["--rows=arat:methd=arat"], "row arat: unknown training flag 'methd'"),
    (["--rows=arat:method=nope"], "row arat: --method=nope:"),
    (["--rows=arat:seed=3"], "row arat: seed is set by the grid runner"),
    (["--rows=a:method=arat;a:method=pgd_at"], "row name 'a' is used twice"),
    (["--rows=arat:method=arat", "--base_flagfile=nope.flags"], "base flagfile nope.flags"),
    (["--rows=arat:method=arat", "--seeds=0,x"], "--seeds must be integers"),
    (["--rows=arat:method=arat", "--attacks=clean,fgsm"], "unknown attack 'fgsm'"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    base = [] if any(a.startswith("--base_flagfile") for a in args) else [
        "--base_flagfile=quickstart.flags"]
    proc, _ = run_grid(*base, *args, f"--workdir={tmp_path}/g", timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(tmp_path, "g", "grid.json"))


def test_rows_parse_lists_and_the_shipped_flagfiles_are_valid():
    from keras_arat import grid_spec
    fv = grid_spec.train_flag_values()
    rows = grid_spec.parse_rows(
        ["a:method=arat,lr_values=0.1,0.01,lr_boundaries=3;b:", "c:split_bn=false"], fv)
    assert rows == [{"name": "a", "overrides": [("method", "arat"),
                                                  ("lr_values", "0.1,0.01"),
                                                  ("lr_boundaries", "3")]},
                    {"name": "b", "overrides": []},
                    {"name": "c", "overrides": [("split_bn", "false")]}]
    shipped = {"tradeoff_quickstart.flags": (4, {"arat", "pgd_at", "trades", "mart"}, 0),
               "tradeoff_cifar.flags": (8, {"arat", "pgd_at", "trades", "mart"}, 3),
               "ablation_quickstart.flags": (7, {"arat"}, 6)}
    for name, (n_rows, want_methods, single_bn) in shipped.items():
        proc, _ = run_grid(f"--flagfile=configs/{name}", "--workdir=/nonexistent/g",
                           "--dry_run", timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        commands = [c for c in proc.stdout.splitlines() if c.startswith("python -m ")]
        assert len(commands) == 3 * n_rows and all(
            c.startswith("python -m keras_arat.train") for c in commands)
        methods = {c.split("--method=")[-1].split()[0] for c in commands if "--method=" in c}
        assert methods == want_methods
        assert sum("--split_bn=false" in c for c in commands) == single_bn
        if name.endswith("quickstart.flags"):  # every digits cell warms eps up, on the
            assert all("--eps_warmup_epochs=2" in c and "--cnn_stem_stride=2" in c  # fast CNN
                       for c in commands)
        assert not os.path.exists("/nonexistent/g")
    # The baselines' own recipes are the official codes' hyper-parameters.
    for name, want in (("trades_cifar.flags", {"weight_decay": "2e-4", "step_size": "0.007",
                                               "beta": "6", "eps": "0.031"}),
                       ("mart_cifar.flags", {"lr_values": "0.01,0.001,0.0001,0.00001",
                                             "weight_decay": "3.5e-3", "beta": "5",
                                             "step_size": "0.007", "epochs": "120"})):
        lines = dict(line.strip()[2:].split("=", 1) for line in open(
            os.path.join(ROOT, "configs", name)) if line.startswith("--"))
        assert {k: lines[k] for k in want} == want


def test_extra_attacks_run_keras_arat_evaluate_on_finished_cells(grid, tmp_path):
    """--attacks beyond clean,pgd20 evaluate finished cells without retraining them."""
    workdir, _, _ = grid
    copy = str(tmp_path / "g")
    os.makedirs(copy)
    shutil.copytree(os.path.join(workdir, "arat"), os.path.join(copy, "arat"))
    shutil.copy(os.path.join(workdir, "grid.json"), copy)
    seed_0 = os.path.join(copy, "arat", "seed_0")
    checkpoints = sorted(os.listdir(os.path.join(seed_0, "checkpoints")))
    results = json.load(open(os.path.join(seed_0, "results.json")))
    args = ["--base_flagfile=configs/quickstart.flags", f"--overrides={TINY}", "--seeds=0",
            "--rows=arat:method=arat", "--attacks=clean,pgd20,cw,autoattack",
            f"--workdir={copy}"]
    proc, _ = run_grid(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[arat/seed_0] evaluating cw" in proc.stdout and "] training" not in proc.stdout
    assert "--n_examples=64 --checkpoint=epoch-0001 --seed=0" in proc.stdout
    assert sorted(os.listdir(os.path.join(seed_0, "checkpoints"))) == checkpoints
    assert json.load(open(os.path.join(seed_0, "results.json"))) == results  # untouched
    # The extra attacks ran on exactly the trainer's 64 test images, at its checkpoint.
    record = json.load(open(os.path.join(seed_0, "evals",
                                         "epoch-0001-adv-linf-eps0.3-n64.json")))
    accs = {r["attack"]: r["acc"] for r in record["results"]}
    assert accs["clean"] == results["clean_acc"] and "pgd20" not in accs
    with open(os.path.join(copy, "table.csv")) as f:
        line = next(csv.DictReader(f))
    assert float(line["cw_mean"]) == pytest.approx(accs["cw"])
    assert line["cw_std"] == "" and line["cw_n"] == "1"  # one seed: no std
    assert float(line["autoattack_mean"]) == pytest.approx(accs["autoattack"])
    over = {r["attack"]: r["worst_case_over"] for r in record["results"]}
    assert over["autoattack"] == ["clean", "autoattack"]  # AutoAttack's figure alone
    md = read(os.path.join(copy, "table.md"))
    assert "| Clean | PGD-20 | CW-20 | AutoAttack |" in md
    assert "measured on the same first 64 test images" in md
    # Once evaluated, the cell is finished for these attacks too.
    proc, _ = run_grid(*args)
    assert proc.returncode == 0 and "[arat/seed_0] finished: skipped" in proc.stdout


def test_comparison_verdicts():
    import types

    from keras_arat import grid_report
    grid = types.SimpleNamespace(rows=[{"name": "a"}], attacks=["clean", "pgd20"])

    def row(name, mean, std, complete=True):
        return {"row": name, "complete": complete, "stats": {"clean+pgd20": (mean, std)}}

    summary = [row("a", 170.0, 1.0), row("tie", 170.0 + 1e-12, 2.0), row("near", 168.0, 2.0),
               row("far", 160.0, 2.0), row("above", 171.0, 1.0), row("best", 180.0, 1.0),
               row("broken", 150.0, 0.0, complete=False)]
    assert {o["row"]: o["verdict"] for o in grid_report.comparisons(grid, summary)[1]} == {
        "tie": "level", "near": "ahead, within 2 seed-std", "far": "clear lead",
        "above": "behind, within 2 seed-std", "best": "clearly behind",
        "broken": "not comparable (a seed did not converge)"}
    # --compare_to names another reference row.
    ref, verdicts = grid_report.comparisons(grid, summary[:2] + summary[5:6], compare_to="best")
    assert ref == "best" and {o["row"]: o["verdict"] for o in verdicts} == {
        "a": "clear lead", "tie": "clear lead"}  # best is 10 points above both


def test_the_grid_library_does_not_import_its_command_line():
    """keras_arat.grid_* is the library, keras_arat.experiments the command line on top."""
    import ast
    paths = glob.glob(os.path.join(ROOT, "keras_arat", "grid_*.py"))
    assert len(paths) >= 4
    for path in paths:
        tree = ast.parse(read(path))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {f"{n.module}.{a.name}" for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not [n for n in names if "experiments" in n], path


def test_names_that_left_experiments_resolve_with_a_deprecation_warning():
    """The grid's library moved out of the command line; its old names still resolve."""
    import warnings

    from keras_arat import experiments, grid_report, grid_spec
    for old, new in (("parse_rows", grid_spec.parse_rows),
                     ("comparisons", grid_report.comparisons)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert getattr(experiments, old) is new
        assert [w.category for w in caught] == [DeprecationWarning]
    with pytest.raises(AttributeError):
        experiments.no_such_name  # noqa: B018
