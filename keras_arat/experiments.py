"""Train and evaluate a grid of methods x seeds and report the clean/robust trade-off.

    python -m keras_arat.experiments --flagfile=configs/tradeoff_quickstart.flags \
        --workdir=runs/tradeoff [--attacks=clean,pgd20,autoattack] [--seeds=0,1]

A grid is ROWS x SEEDS cells. Each cell is one training run in its own subprocess,

    python -m keras_arat.train --flagfile=BASE --verbose=2 [shared overrides] \
        [row overrides] --seed=S --workdir=GRID/ROW/seed_S

so later settings win: a row's overrides beat the shared ones, which beat the base flagfile.
A cell that crashes is marked failed (the tail of its stderr goes to the log and to
grid.json) and the grid goes on. --jobs=N runs N cells at a time, each subprocess given
(CPU cores / N) intra-op threads: on a CPU a small model keeps two cores only partly busy,
so two cells side by side finish in about the time of one (BENCHMARKS.md). Re-running
the same command skips finished cells, resumes a partial one through the trainer's own
resume, and retries failed ones.

Rows (--rows, repeatable; one value may hold several rows separated by ';'):

    NAME:key=value,key=value,...

NAME is [A-Za-z0-9_.-]+ and names the row's folder; each key is a flag of keras_arat.train
(without the dashes), or recipe=FILE.flags: the row's own base flagfile (a baseline's
published hyper-parameters, say) instead of --base_flagfile; the table names each row's.
A piece without '=' continues the previous value when that flag is a list, so
`arat_lr:method=arat,lr_values=0.1,0.01,lr_boundaries=3` works. `NAME:` alone
trains the base configuration. --overrides takes the same key=value list for every cell.
--rows and --overrides accumulate (flagfile and command line); --only_rows=a,b selects.
Keys and values are checked against the trainer's flags before anything runs; the trainer's
own checks (e.g. eps in (0, 1]) happen in the cell, which then fails alone.

Outputs in --workdir: grid.json (status of every cell), experiments.log, table.md and
table.csv (per row: recipe, seeds converged, mean and sample std over the converged seeds
of every accuracy and of clean + robust; table.md also per seed), tradeoff.png (clean vs
robust accuracy, one labelled marker per row at the mean, error bars = std, FAILED cells
as grey crosses). Each cell folder is an ordinary training run with train.log
and train.stderr.log next to the trainer's files.

Convergence rule (--min_clean_acc, --min_robust_acc): a cell that trained but stays below
either floor did not learn what it should; it is reported FAILED with its figures in the
per-seed table and the plot, and left out of its row's mean and std. table.md ends with
the reference row's (--compare_to) clean + robust sums against every other row's.

Every figure of a cell is measured on the same first N test images (the trainer's
--eval_examples), at the checkpoint training ended with: the extra attacks run through
keras_arat.evaluate on exactly those images, and their figures are read back from the
record of that setting only.

Exit status: 0 when every cell finished, 1 when some crashed, 2 on bad input.
"""

import csv
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

from absl import app, flags

from keras_arat import files, records, runs

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags, defined on absl's global FLAGS when the command runs (not on
    import: the trainer's modules define some of the same names, e.g. --workdir)."""
    if "jobs" in FLAGS:
        return
    flags.DEFINE_string("workdir", None, "Grid folder (one sub-folder per row and seed).")
    flags.DEFINE_string("base_flagfile", None, "Training flagfile every cell shares (a bare "
                        "name is also looked up in configs/).")
    flags.DEFINE_multi_string("rows", [], "Rows 'NAME:key=value,...'; repeat the flag or "
                              "separate rows with ';'.")
    flags.DEFINE_list("only_rows", [], "Run and report only these rows of --rows (by name), "
                      "e.g. to try a subset of a flagfile's grid.")
    flags.DEFINE_list("seeds", ["0"], "Seeds: every row is trained once per seed.")
    flags.DEFINE_multi_string("overrides", [], "Training flags every cell shares, as "
                              "key=value,... (repeatable); they beat --base_flagfile.")
    flags.DEFINE_list("attacks", ["clean", "pgd20"], "Evaluations to report. clean and pgd20 come "
                      "from the trainer; others (cw, autoattack) run keras_arat.evaluate on the "
                      "adv branch. autoattack is skipped with a warning when keras_arat.evaluate "
                      "does not offer it.")
    flags.DEFINE_float("min_clean_acc", None, "Convergence rule: a cell whose clean accuracy "
                       "is below this did not train; it is reported FAILED, not averaged in.")
    flags.DEFINE_float("min_robust_acc", None, "Convergence rule: likewise for PGD-20 accuracy "
                       "(the sign that a cell learned robustness at all).")
    flags.DEFINE_string("compare_to", None, "Row whose clean + robust sums the others are "
                        "compared with in table.md (default: the first row).")
    flags.DEFINE_integer("jobs", 1, "Cells run at the same time, each a subprocess with "
                         "(CPU cores / jobs) intra-op threads (TF_NUM_INTRAOP_THREADS, unless "
                         "set). Each cell trains and is evaluated as with 1; only the thread "
                         "count differs, which may change float rounding.")
    flags.DEFINE_bool("retry_failed", True, "Run cells that failed before again.")
    flags.DEFINE_integer("cell_timeout", None, "Seconds after which a cell's subprocess is "
                         "stopped and the cell marked failed (default: no limit).")
    flags.DEFINE_bool("report_only", False, "Only rewrite the table and plot from the cells.")
    flags.DEFINE_bool("dry_run", False, "Print each cell's command and do nothing else.")


NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# Cell settings the runner owns.
RESERVED = {"workdir", "seed", "flagfile", "overwrite", "resume"}
BUILTIN_ATTACKS = ("clean", "pgd20")  # the trainer's own final evaluation
STDERR_TAIL = 12


# ------------------------------------------------------------------ parsing the grid

def train_flag_values():
    """A FlagValues holding the trainer's flags, to check keys and values of overrides."""
    fv = flags.FlagValues()

    class _Definer:
        def __getattr__(self, name):
            define = getattr(flags, name)
            return lambda *a, **k: define(*a, flag_values=fv, **k)

    runs.define_train_flags(_Definer())
    return fv


def _is_list_flag(flag):
    base = getattr(flags, "BaseListParser", flags.ListParser)
    return isinstance(flag.parser, base)


def parse_overrides(text, where, fv, allow_recipe=False):
    """'k=v,k=v' -> [(k, v)], checked against the trainer's flags.

    allow_recipe: a row may name its own base flagfile, recipe=FILE (e.g. a baseline's
    own published hyper-parameters), used instead of --base_flagfile.
    """
    pairs = []
    for piece in text.split(","):
        piece = piece.strip()
        if not piece:
            continue
        if "=" not in piece:
            if pairs and _is_list_flag(fv[pairs[-1][0]]):
                pairs[-1] = (pairs[-1][0], pairs[-1][1] + "," + piece)
                continue
            raise runs.UsageError(f"{where}: '{piece}' is not key=value")
        key, value = (s.strip() for s in piece.split("=", 1))
        key = key.lstrip("-")
        if key == "recipe" and allow_recipe:
            pairs.append((key, resolve_base_flagfile(value)))
            continue
        if key in RESERVED:
            raise runs.UsageError(f"{where}: {key} is set by the grid runner, not per row")
        if key not in fv:
            raise runs.UsageError(f"{where}: unknown training flag '{key}'")
        pairs.append((key, value))
    for key, value in pairs:
        if key == "recipe":
            check_base_flagfile(value, fv)
            continue
        try:
            fv[key].parser.parse(value)
        except (ValueError, TypeError) as e:
            raise runs.UsageError(f"{where}: --{key}={value}: {e}") from None
    return pairs


def parse_rows(values, fv):
    """--rows values -> [{"name", "overrides": [(k, v)]}] in order."""
    rows, seen = [], set()
    for value in values:
        for text in value.split(";"):
            text = text.strip()
            if not text:
                continue
            if ":" not in text:
                raise runs.UsageError(f"row '{text}' has no ':' (write NAME:key=value,...)")
            name, spec = (s.strip() for s in text.split(":", 1))
            if not NAME_RE.match(name):
                raise runs.UsageError(f"row name '{name}' must match {NAME_RE.pattern}")
            if name in seen:
                raise runs.UsageError(f"row name '{name}' is used twice")
            seen.add(name)
            pairs = parse_overrides(spec, f"row {name}", fv, allow_recipe=True)
            recipe = [v for k, v in pairs if k == "recipe"]
            row = {"name": name, "overrides": [(k, v) for k, v in pairs if k != "recipe"]}
            if recipe:
                row["recipe"] = recipe[-1]
            rows.append(row)
    if not rows:
        raise runs.UsageError("no rows: pass --rows=NAME:key=value,... (see the module doc)")
    return rows


def parse_seeds(values):
    try:
        seeds = [int(s) for s in values if str(s).strip()]
    except ValueError:
        raise runs.UsageError(f"--seeds must be integers, got {','.join(values)}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise runs.UsageError("--seeds must list at least one seed, each once")
    return seeds


def resolve_base_flagfile(path):
    if not path:
        raise runs.UsageError("--base_flagfile is required (the training settings of every "
                              "cell, e.g. configs/quickstart.flags)")
    if not os.path.exists(path):
        candidate = os.path.join(runs.CONFIGS_DIR, os.path.basename(path))
        if not os.path.exists(candidate):
            raise runs.UsageError(f"base flagfile {path} not found (looked in the current "
                                  f"directory and in {runs.CONFIGS_DIR})")
        path = candidate
    return os.path.abspath(path)


def check_base_flagfile(path, fv):
    """Every --key=value line of the base flagfile must be a training flag."""
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#") or line.startswith("//"):
                continue
            key = line.lstrip("-").split("=", 1)[0]
            if key.startswith("no") and key[2:] in fv:
                continue
            if key != "flagfile" and key not in fv:
                raise runs.UsageError(f"{path}:{number}: unknown training flag '{key}'")


def resolve_attacks(names, log):
    """Keep the requested attacks that can run; autoattack may be absent."""
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    extra = [n for n in names if n not in BUILTIN_ATTACKS]
    if not extra:
        return list(BUILTIN_ATTACKS)
    from keras_arat import quiet
    quiet.import_tensorflow()  # evaluate imports it: only when extra attacks are asked
    from keras_arat import evaluation
    available = tuple(getattr(evaluation, "ATTACKS", ()))
    kept = []
    for name in extra:
        if name in available:
            kept.append(name)
        elif name == "autoattack":
            log(f"warning: autoattack is not in keras_arat.evaluation.ATTACKS {available}: "
                "skipped (the table reports clean and PGD-20 only)")
        else:
            raise runs.UsageError(f"unknown attack '{name}'; choose from "
                                  f"{list(dict.fromkeys(BUILTIN_ATTACKS + available))}")
    return list(BUILTIN_ATTACKS) + kept


# ------------------------------------------------------------------------- cells

# --jobs runs cells in threads: grid.json, the log and the set of running subprocesses are
# changed under LOCK; STOP is set when the grid is stopped, so that a cell whose subprocess
# was killed records nothing (it is marked interrupted instead).
LOCK = threading.RLock()
RUNNING = set()
STOP = threading.Event()


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


class Grid:
    def __init__(self, workdir, base, shared, rows, seeds, attacks):
        self.workdir = os.path.abspath(workdir)
        self.base, self.shared, self.rows, self.seeds = base, shared, rows, seeds
        self.attacks = attacks
        self.state_path = os.path.join(self.workdir, "grid.json")
        self.state = {"cells": {}}
        if os.path.exists(self.state_path):
            try:
                with open(self.state_path) as f:
                    self.state = json.load(f)
            except ValueError:
                pass  # a damaged grid.json only costs re-checking the cells
        self.state.setdefault("cells", {})

    @staticmethod
    def key(row, seed):
        return f"{row['name']}/seed_{seed}"

    def cell_dir(self, row, seed):
        return os.path.join(self.workdir, row["name"], f"seed_{seed}")

    def base_of(self, row):
        return row.get("recipe") or self.base

    def train_args(self, row, seed):
        args = [f"--flagfile={self.base_of(row)}", "--verbose=2"]
        args += [f"--{k}={v}" for k, v in self.shared]
        args += [f"--{k}={v}" for k, v in row["overrides"]]
        args += [f"--seed={seed}", f"--workdir={self.cell_dir(row, seed)}"]
        return args

    def signature(self, row, seed):
        """What makes a finished cell current: its flags (paths relative, so a grid folder or
        checkout can move) and the base flagfile's content."""
        args = self.train_args(row, seed)
        args[0] = f"--flagfile={os.path.basename(self.base_of(row))}"
        args[-1] = f"--workdir={row['name']}/seed_{seed}"
        return {"args": args, "base_sha256": _sha(self.base_of(row))}

    def save(self):
        with LOCK:
            self._save()

    def _save(self):
        self.state.update(base_flagfile=self.base, overrides=[f"{k}={v}" for k, v in self.shared],
                          rows=[{"name": r["name"], "recipe": self.base_of(r),
                                 "overrides": [f"{k}={v}" for k, v in r["overrides"]]}
                                for r in self.rows],
                          seeds=self.seeds, attacks=self.attacks,
                          updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        os.makedirs(self.workdir, exist_ok=True)
        files.write_json(self.state_path, self.state)

    def results(self, row, seed):
        path = os.path.join(self.cell_dir(row, seed), "results.json")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None


ATTACK_NAMES = {"clean": "Clean", "pgd20": "PGD-20", "cw": "CW-20", "autoattack": "AutoAttack"}


def metric(results, name):
    """Training's own figure of attack `name` (adv branch) from results.json, or None."""
    if results is None:
        return None
    value = results.get(f"{name}_acc")
    return None if value is None else float(value)


def cell_figures(grid, row, seed):
    """{attack: accuracy or None} of a cell, every figure on the same test images.

    clean and PGD-20 come from training's final evaluation (results.json); the other
    attacks from keras_arat.evaluate's record of exactly that setting: the same
    checkpoint, adv branch, eps and first-N test images. A figure measured on other
    images or at another eps is not this cell's and is not used.
    """
    results = grid.results(row, seed)
    if results is None:
        return None
    figures = {a: metric(results, a) for a in BUILTIN_ATTACKS}
    source = os.path.basename(results.get("checkpoint", ""))
    for attack in grid.attacks:
        if attack in BUILTIN_ATTACKS:
            continue
        entry = records.find_evaluation(grid.cell_dir(row, seed), source, attack, "adv",
                                        results["eps"], results["n_examples"])
        figures[attack] = None if entry is None else float(entry["acc"])
    figures["n_examples"] = results.get("n_examples")
    figures["eps"] = results.get("eps")
    return figures


def verdict(figures):
    """(True, "") if a cell meets the convergence rule (--min_clean_acc, --min_robust_acc),
    else (False, the reason)."""
    reasons = []
    for name, flag in (("clean", "min_clean_acc"), ("pgd20", "min_robust_acc")):
        floor = getattr(FLAGS, flag)
        if floor is not None and figures.get(name) is not None and figures[name] < floor:
            reasons.append(f"{ATTACK_NAMES[name]} {figures[name]:.3f} < {floor:g}")
    return not reasons, "; ".join(reasons)


# TensorFlow's start-up chatter, dropped from the stderr tails in the log and grid.json.
NOISE_RE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl|"
                      r"To enable the following instructions|This TensorFlow binary is optimized)")


def _tail(path, n=STDERR_TAIL):
    """The last lines this invocation wrote to a log (after its ===== header), minus noise."""
    try:
        with open(path, errors="replace") as f:
            lines = [ln.rstrip() for ln in f if ln.strip()]
    except OSError:
        return ""
    starts = [i for i, ln in enumerate(lines) if ln.startswith("===== ")]
    lines = [ln for ln in lines[starts[-1] + 1 if starts else 0:] if not NOISE_RE.match(ln)]
    errors = [ln for ln in lines if ln.startswith("error:")]
    tail = lines[-n:]
    for ln in errors[-1:]:
        if ln not in tail:
            tail.append(ln)
    return "\n".join(tail)


def run_subprocess(module, args, cell_dir, label, timeout):
    """Run `python -m module args`, output appended to the cell's logs. Returns (ok, error)."""
    os.makedirs(cell_dir, exist_ok=True)
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if FLAGS.jobs > 1:  # the cores shared out between the cells running side by side
        env.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, (os.cpu_count() or 1) // FLAGS.jobs)))
    out_path = os.path.join(cell_dir, "train.log")
    err_path = os.path.join(cell_dir, "train.stderr.log")
    with open(out_path, "a") as out, open(err_path, "a") as err:
        for f in (out, err):
            f.write(f"\n===== {label} {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                    f"python -m {module} {' '.join(args)}\n")
            f.flush()
        proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=err,
                                env=env)
        with LOCK:
            RUNNING.add(proc)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return False, f"timed out after {timeout} s\n" + _tail(err_path)
        finally:  # a stopped grid kills what is still in RUNNING (main)
            with LOCK:
                RUNNING.discard(proc)
    if proc.returncode != 0:
        return False, f"exit status {proc.returncode}\n" + _tail(err_path)
    return True, ""


def extra_attacks_missing(grid, row, seed):
    figures = cell_figures(grid, row, seed) or {}
    return [a for a in grid.attacks if a not in BUILTIN_ATTACKS and figures.get(a) is None]


def run_cell(grid, row, seed, log):
    """Bring one cell to 'done' (or 'failed'); returns its status."""
    key, cell_dir = grid.key(row, seed), grid.cell_dir(row, seed)
    sig = grid.signature(row, seed)
    entry = grid.state["cells"].get(key, {})
    results = grid.results(row, seed)
    trained = (entry.get("status") == "done" and entry.get("signature") == sig
               and metric(results, "clean") is not None and metric(results, "pgd20") is not None)
    if entry.get("status") == "failed" and entry.get("signature") == sig \
            and not FLAGS.retry_failed:
        log(f"[{key}] failed before; skipped (--retry_failed=false)")
        return "failed"
    missing = extra_attacks_missing(grid, row, seed) if trained else list(grid.attacks[2:])
    if trained and not missing:
        log(f"[{key}] finished: skipped")
        return "done"

    start = time.time()
    entry = {"row": row["name"], "seed": seed, "workdir": cell_dir, "signature": sig,
             "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with LOCK:
        grid.state["cells"][key] = entry
        grid.save()
    error = ""
    if not trained:
        resuming = os.path.isdir(os.path.join(cell_dir, "checkpoints"))
        log(f"[{key}] training{' (resuming)' if resuming else ''}: python -m keras_arat.train "
            + " ".join(grid.train_args(row, seed)))
        ok, error = run_subprocess("keras_arat.train", grid.train_args(row, seed), cell_dir,
                                   "train", FLAGS.cell_timeout)
    else:
        ok = True
    if ok and missing and not STOP.is_set():
        # The training's own test images, eps, checkpoint, seed and batches; each extra
        # figure is its attack alone, as the trainer's clean and PGD-20 are.
        results = grid.results(row, seed) or {}
        config = runs.read_config(cell_dir)
        args = [f"--workdir={cell_dir}", f"--attacks=clean,{','.join(missing)}",
                "--branch=adv", f"--n_examples={results.get('n_examples')}",
                f"--checkpoint={os.path.basename(results.get('checkpoint', 'latest'))}",
                f"--seed={config.seed}", f"--batch_size={config.eval_batch_size}",
                "--noprogress"]
        log(f"[{key}] evaluating {','.join(missing)}: python -m keras_arat.evaluate "
            + " ".join(args))
        ok, error = run_subprocess("keras_arat.evaluate", args, cell_dir, "evaluate",
                                   FLAGS.cell_timeout)
    if STOP.is_set():  # killed with the grid: main() marks the cell interrupted
        return "interrupted"
    with LOCK:
        return _record_cell(grid, row, seed, entry, ok, error, start, log)


def _record_cell(grid, row, seed, entry, ok, error, start, log):
    key, cell_dir = grid.key(row, seed), grid.cell_dir(row, seed)
    results = grid.results(row, seed)
    if ok and (metric(results, "clean") is None or metric(results, "pgd20") is None):
        ok, error = False, "the run ended without clean_acc and pgd20_acc in results.json"
    entry["seconds"] = round(time.time() - start, 1)
    if ok:
        entry["status"] = "done"
        figures = cell_figures(grid, row, seed)
        entry["results"] = {a: figures.get(a) for a in grid.attacks}
        entry["n_examples"] = figures["n_examples"]
        entry.pop("error", None)
        converged, why = verdict(figures)
        entry["converged"] = converged
        accs = ", ".join(f"{a} {100 * v:.2f}%" for a, v in entry["results"].items()
                         if v is not None)
        log(f"[{key}] done in {entry['seconds']:.0f} s: {accs} on {figures['n_examples']} "
            f"test images" + ("" if converged else f"; FAILED the convergence rule ({why})"))
    else:
        entry["status"] = "failed"
        entry["error"] = error
        log(f"[{key}] FAILED after {entry['seconds']:.0f} s ({error.splitlines()[0]}); "
            f"stderr tail (full log: {cell_dir}/train.stderr.log):")
        for line in error.splitlines()[1:]:
            log(f"    {line}")
    grid.save()
    return entry["status"]


# ------------------------------------------------------------------------ report

def mean_std(values):
    """Mean and sample standard deviation (ddof=1; None for fewer than two values)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def summarize(grid):
    """Per row: each seed's figures and verdict, and mean/std over the converged seeds.

    A cell that crashed, or trained but missed the convergence rule, is listed with its
    reason and left out of the row's mean and std: a run that did not train is a failed
    run, not a data point. `complete` says whether every seed of the row converged.
    """
    robust = [a for a in grid.attacks if a != "clean"]
    columns = list(grid.attacks) + [f"clean+{a}" for a in robust]
    summary = []
    for row in grid.rows:
        cells, failed = [], []
        for seed in grid.seeds:
            entry = grid.state["cells"].get(grid.key(row, seed), {})
            if entry.get("status") == "failed":
                failed.append((seed, "crashed: " + (entry.get("error") or "?").splitlines()[0]))
                continue
            if entry.get("status") != "done":
                continue
            figures = cell_figures(grid, row, seed)
            if figures is None or figures["clean"] is None or figures["pgd20"] is None:
                continue
            for a in robust:
                if figures.get(a) is not None:
                    figures[f"clean+{a}"] = figures["clean"] + figures[a]
            converged, why = verdict(figures)
            cells.append({"seed": seed, "figures": figures, "converged": converged,
                          "reason": why})
            if not converged:
                failed.append((seed, why))
        good = [c["figures"] for c in cells if c["converged"]]
        stats = {}
        for c in columns:
            stats[c] = mean_std([v[c] for v in good if v.get(c) is not None])
            stats[c + ":n"] = sum(1 for v in good if v.get(c) is not None)
        method = dict(grid.shared + row["overrides"]).get("method") or _base_method(
            grid.base_of(row))
        summary.append({"row": row["name"], "method": method,
                        "recipe": os.path.basename(grid.base_of(row)),
                        "overrides": ",".join(f"{k}={v}" for k, v in row["overrides"]),
                        "seeds": [c["seed"] for c in cells if c["converged"]],
                        "cells": cells, "failed": failed, "stats": stats,
                        "complete": len(good) == len(grid.seeds)})
    return columns, summary


def _base_method(path):
    method = "arat"  # the trainer's default
    with open(path) as f:
        for line in f:
            if line.strip().startswith("--method="):
                method = line.strip().split("=", 1)[1]
    return method


def _pct(mean, std):
    if mean is None:
        return "–"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def image_counts(summary):
    """Sorted numbers of test images over the grid's evaluated cells (one, normally)."""
    return sorted({c["figures"]["n_examples"] for s in summary for c in s["cells"]
                   if c["figures"].get("n_examples") is not None})


def _label(column):
    return " + ".join(ATTACK_NAMES.get(p, p) for p in column.split("+"))


def comparisons(grid, summary):
    """The reference row's clean + robust sums against every other row's.

    A lead counts as clear when the difference of the means exceeds twice the larger of
    the two rows' seed standard deviations. Only rows whose every seed converged are
    compared; the others are named as not comparable.
    """
    by_name = {s["row"]: s for s in summary}
    ref_name = FLAGS.compare_to or grid.rows[0]["name"]
    if ref_name not in by_name:
        return ref_name, []
    ref = by_name[ref_name]
    out = []
    sums = [c for c in (f"clean+{a}" for a in grid.attacks if a != "clean")]
    for s in summary:
        if s is ref:
            continue
        for column in sums:
            (ma, sa), (mb, sb) = ref["stats"][column], s["stats"][column]
            item = {"row": s["row"], "column": column}
            if not (ref["complete"] and s["complete"]) or ma is None or mb is None:
                item["verdict"] = "not comparable (" + (
                    "a seed did not converge" if not (ref["complete"] and s["complete"])
                    else "missing figures") + ")"
            else:
                diff = ma - mb
                threshold = 2 * max(sa or 0.0, sb or 0.0)
                item.update(diff=diff, threshold=threshold)
                if abs(diff) < 0.005:  # equal at the table's two decimals
                    item["verdict"] = "level"
                elif diff > threshold:
                    item["verdict"] = "clear lead"
                elif diff > 0:
                    item["verdict"] = "ahead, within 2 seed-std"
                elif diff >= -threshold:
                    item["verdict"] = "behind, within 2 seed-std"
                else:
                    item["verdict"] = "clearly behind"
            out.append(item)
    return ref_name, out


def write_table(grid, columns, summary, counts):
    csv_path = os.path.join(grid.workdir, "table.csv")
    header = ["row", "method", "recipe", "overrides", "seeds_converged", "seeds_total",
              "seeds_failed", "n_examples"]
    for c in columns:
        header += [f"{c}_mean", f"{c}_std", f"{c}_n"]
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for s in summary:
            line = [s["row"], s["method"], s["recipe"], s["overrides"], len(s["seeds"]),
                    len(grid.seeds), len(s["failed"]), ",".join(str(n) for n in counts)]
            for c in columns:
                mean, std = s["stats"][c]
                line += ["" if mean is None else repr(mean), "" if std is None else repr(std),
                         s["stats"][c + ":n"]]
            writer.writerow(line)
    os.replace(csv_path + ".tmp", csv_path)

    eps = sorted({c["figures"]["eps"] for s in summary for c in s["cells"]
                  if c["figures"].get("eps") is not None})
    rule = [f"clean ≥ {FLAGS.min_clean_acc:g}" if FLAGS.min_clean_acc is not None else "",
            f"PGD-20 ≥ {FLAGS.min_robust_acc:g}" if FLAGS.min_robust_acc is not None else ""]
    rule = " and ".join(r for r in rule if r)
    n_text = ", ".join(str(n) for n in counts) or "?"
    lines = [
        "# Clean / robust trade-off",
        "",
        f"Shared overrides: `{','.join(f'{k}={v}' for k, v in grid.shared) or 'none'}`; seeds "
        f"{','.join(str(s) for s in grid.seeds)}; eps {', '.join(f'{e:.4g}' for e in eps) or '?'}"
        " (L-inf).",
        f"Every column is measured on the same first {n_text} test images, through the adv "
        "branch, at the checkpoint training ended with. Accuracies in %: mean ± sample std "
        "over the seeds that converged (no ± with one seed).",
        (f"Convergence rule: {rule}, in every seed. A cell that misses it did not train: it "
         "is listed as FAILED and left out of its row's mean." if rule else
         "No convergence rule was set (--min_clean_acc, --min_robust_acc)."),
        "",
        "| Row | Recipe | Method | Overrides | Seeds | " + " | ".join(
            _label(c) for c in columns) + " |",
        "|---|---|---|---|---|" + "---:|" * len(columns),
    ]
    for s in summary:
        seeds = f"{len(s['seeds'])}/{len(grid.seeds)}"
        if s["failed"]:
            seeds += f" ({len(s['failed'])} FAILED)"
        name = s["row"] if s["complete"] else f"{s['row']} (FAILED)"
        cells = [_pct(*s["stats"][c]) for c in columns]
        lines.append(f"| {name} | {s['recipe']} | {s['method']} | {s['overrides'] or '–'} | "
                     f"{seeds} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (%):", "",
              "| Row | Seed | " + " | ".join(ATTACK_NAMES.get(a, a) for a in grid.attacks)
              + " | Verdict |", "|---|---:|" + "---:|" * len(grid.attacks) + "---|"]
    for s in summary:
        reasons = dict(s["failed"])
        for c in s["cells"]:
            accs = [_pct(c["figures"].get(a), None) for a in grid.attacks]
            lines.append(f"| {s['row']} | {c['seed']} | " + " | ".join(accs) + " | "
                         + ("converged" if c["converged"] else f"FAILED: {c['reason']}") + " |")
        for seed, why in s["failed"]:
            if why.startswith("crashed"):
                lines.append(f"| {s['row']} | {seed} | " + " | ".join("–" for _ in grid.attacks)
                             + f" | FAILED: {reasons[seed]} |")
    ref, comps = comparisons(grid, summary)
    if comps:
        lines += ["", f"Clean + robust sums against `{ref}` (a clear lead: the difference of "
                  "the means exceeds twice the larger seed std of the two rows):", ""]
        for c in comps:
            if "diff" in c:
                lines.append(f"- {ref} vs {c['row']}, {_label(c['column'])}: "
                             f"{100 * c['diff']:+.2f} points (2 seed-std: "
                             f"{100 * c['threshold']:.2f}): {c['verdict']}")
            else:
                lines.append(f"- {ref} vs {c['row']}, {_label(c['column'])}: {c['verdict']}")
    md_path = os.path.join(grid.workdir, "table.md")
    with open(md_path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(md_path + ".tmp", md_path)
    return md_path, csv_path


def write_plot(grid, columns, summary, counts):
    try:
        import matplotlib
    except ImportError:
        return None  # the tables are written; main() says the plot is missing
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Robust axis: AutoAttack when every plotted row has it, else PGD-20.
    plotted = [s for s in summary if s["stats"]["clean"][0] is not None]
    robust = "pgd20"
    if "autoattack" in columns and plotted and all(
            s["stats"]["autoattack"][0] is not None for s in plotted):
        robust = "autoattack"
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    placed = []
    for s in plotted:
        cm, cs = s["stats"]["clean"]
        rm, rs = s["stats"][robust]
        ax.errorbar(100 * rm, 100 * cm, xerr=100 * (rs or 0.0), yerr=100 * (cs or 0.0),
                    fmt="o", capsize=3, label=s["row"])
        # rows that land on (almost) the same point get their labels stacked downwards
        near = sum(1 for px, py in placed if abs(px - rm) < 0.03 and abs(py - cm) < 0.03)
        placed.append((rm, cm))
        tag = f"n={len(s['seeds'])}" + ("" if s["complete"] else
                                         f", {len(s['failed'])} FAILED")
        ax.annotate(f"{s['row']} ({tag})", (100 * rm, 100 * cm),
                    textcoords="offset points", xytext=(5, 5 - 11 * near), fontsize=8)
    failed = [(s["row"], c) for s in summary for c in s["cells"] if not c["converged"]]
    for i, (name, c) in enumerate(failed):
        r = c["figures"].get(robust)
        if r is None:
            continue
        ax.plot(100 * r, 100 * c["figures"]["clean"], "x", color="grey",
                label="FAILED cells (not averaged)" if i == 0 else None)
        ax.annotate(f"{name} seed {c['seed']} FAILED", (100 * r, 100 * c["figures"]["clean"]),
                    textcoords="offset points", xytext=(5, -10), fontsize=7, color="grey")
    n_text = ", ".join(str(n) for n in counts) or "?"
    ax.set_xlabel(f"{ATTACK_NAMES[robust]} accuracy (%, first {n_text} test images)")
    ax.set_ylabel(f"Clean accuracy (%, the same {n_text} test images)")
    ax.margins(x=0.12)  # room for the labels of the rightmost points
    ax.set_title("Clean vs robust accuracy (mean ± std over converged seeds)")
    ax.grid(True, alpha=0.3)
    if plotted or failed:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no finished cells yet", ha="center", va="center",
                transform=ax.transAxes)
    fig.tight_layout()
    path = os.path.join(grid.workdir, "tradeoff.png")
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


# -------------------------------------------------------------------------- main

def make_logger(workdir, to_file=True):
    path = os.path.join(workdir, "experiments.log")

    def log(message):
        stamp = time.strftime("%H:%M:%S")
        with LOCK:
            print(f"{stamp} {message}", flush=True)
            if not to_file:
                return
            os.makedirs(workdir, exist_ok=True)
            with open(path, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d')} {stamp} {message}\n")

    return log


def build_grid():
    if not FLAGS.workdir:
        raise runs.UsageError("--workdir is required (the grid's folder)")
    fv = train_flag_values()
    base = resolve_base_flagfile(FLAGS.base_flagfile)
    check_base_flagfile(base, fv)
    shared = []
    for value in FLAGS.overrides:
        shared += parse_overrides(value, "--overrides", fv)
    rows = parse_rows(FLAGS.rows, fv)
    if FLAGS.only_rows:
        names = [r["name"] for r in rows]
        unknown = [n for n in FLAGS.only_rows if n not in names]
        if unknown:
            raise runs.UsageError(f"--only_rows: no row named {', '.join(unknown)} (rows: "
                                  f"{', '.join(names)})")
        rows = [r for r in rows if r["name"] in FLAGS.only_rows]
    seeds = parse_seeds(FLAGS.seeds)
    for name in ("min_clean_acc", "min_robust_acc"):
        value = getattr(FLAGS, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise runs.UsageError(f"--{name} must be a fraction in [0, 1], got {value}")
    if FLAGS.compare_to and FLAGS.compare_to not in [r["name"] for r in rows]:
        raise runs.UsageError(f"--compare_to={FLAGS.compare_to} is not a row (rows: "
                              f"{', '.join(r['name'] for r in rows)})")
    if FLAGS.cell_timeout is not None and FLAGS.cell_timeout < 1:
        raise runs.UsageError("--cell_timeout must be >= 1")
    if FLAGS.jobs < 1:
        raise runs.UsageError(f"--jobs must be >= 1, got {FLAGS.jobs}")
    return base, shared, rows, seeds


def main(argv):
    del argv  # runs.parse_flags refused any positional argument
    try:
        base, shared, rows, seeds = build_grid()
        log = make_logger(FLAGS.workdir, to_file=not FLAGS.dry_run)
        attacks = resolve_attacks(FLAGS.attacks, log)
    except runs.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {e.strerror or e} ({getattr(e, 'filename', '') or ''})", file=sys.stderr)
        sys.exit(2)
    grid = Grid(FLAGS.workdir, base, shared, rows, seeds, attacks)

    if FLAGS.dry_run:
        for seed in seeds:  # the order cells run in
            for row in rows:
                print("python -m keras_arat.train " + " ".join(grid.train_args(row, seed)))
        return

    statuses = {}
    if not FLAGS.report_only:
        total = len(rows) * len(seeds)
        log(f"grid {grid.workdir}: {len(rows)} rows x {len(seeds)} seeds = {total} cells; "
            f"attacks {','.join(attacks)}"
            + (f"; {FLAGS.jobs} cells at a time" if FLAGS.jobs > 1 else ""))
        start = time.time()

        def _stop(signum, frame):  # `kill PID` stops the grid like Ctrl-C: the cell's
            raise KeyboardInterrupt  # subprocess is stopped and the cell marked interrupted

        signal.signal(signal.SIGTERM, _stop)
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # started with `&` by a shell
            signal.signal(signal.SIGINT, _stop)
        # Seed-major order: a stopped grid has every row at similar seed counts.
        pool = futures.ThreadPoolExecutor(FLAGS.jobs)
        cells = {grid.key(row, seed): pool.submit(run_cell, grid, row, seed, log)
                 for seed in seeds for row in rows}
        try:
            for key, cell in cells.items():
                statuses[key] = cell.result()
        except KeyboardInterrupt:
            STOP.set()
            pool.shutdown(wait=False, cancel_futures=True)
            with LOCK:
                for proc in list(RUNNING):
                    proc.kill()
            futures.wait([c for c in cells.values() if not c.cancelled()])
            with LOCK:
                for entry in grid.state["cells"].values():
                    if entry.get("status") == "running":
                        entry["status"] = "interrupted"
                grid.save()
            log("interrupted: re-run the same command to continue")
            sys.exit(130)
        pool.shutdown()
        grid.save()
        failed = sorted(k for k, v in statuses.items() if v != "done")
        below = sorted(k for k, v in statuses.items() if v == "done"
                       and grid.state["cells"][k].get("converged") is False)
        log(f"grid finished in {time.time() - start:.0f} s: {total - len(failed)} done, "
            f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
            f"{len(below)} done but FAILED the convergence rule"
            f"{': ' + ', '.join(below) if below else ''}")
    columns, summary = summarize(grid)
    counts = image_counts(summary)  # the test images behind every figure
    md_path, csv_path = write_table(grid, columns, summary, counts)
    png_path = write_plot(grid, columns, summary, counts)
    if png_path is None:
        log("warning: matplotlib is not installed (pip install -r requirements.txt): "
            "no tradeoff.png")
    log(f"wrote {md_path}, {csv_path}" + (f", {png_path}" if png_path else ""))
    with open(md_path) as f:
        print(f.read(), end="")
    if any(v != "done" for v in statuses.values()):
        sys.exit(1)


def run_main():
    define_flags()
    app.run(main, argv=runs.resolve_flagfiles(sys.argv), flags_parser=runs.parse_flags)


if __name__ == "__main__":
    run_main()
