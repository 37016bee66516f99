"""Running a grid's cells (python -m keras_arat.experiments): the grid's state in
grid.json, each cell's training and extra evaluations as subprocesses (--jobs at a time),
the log, stopping on Ctrl-C or SIGTERM, and each finished cell's record."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

from keras_arat import config, files
from keras_arat.grid_figures import cell_figures, extra_attacks_missing, metric, verdict

STDERR_TAIL = 12

# --jobs runs cells in threads: grid.json, the log and the set of running subprocesses are
# changed under LOCK; STOP is set when the grid is stopped, so that a cell whose subprocess
# was killed records nothing (it is marked interrupted instead).
LOCK = threading.RLock()
RUNNING = set()
STOP = threading.Event()


class Interrupted(Exception):
    """The grid was stopped (Ctrl-C, SIGTERM): its running cells are marked interrupted."""


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

    def cells(self):
        """(row, seed) of every cell, seed-major: a stopped grid has every row at similar
        seed counts."""
        return [(row, seed) for seed in self.seeds for row in self.rows]

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


def train_commands(grid):
    """Each cell's training command, in the order the cells run (--dry_run)."""
    return ["python -m keras_arat.train " + " ".join(grid.train_args(row, seed))
            for row, seed in grid.cells()]


def make_logger(workdir, to_file=True):
    """log(message): a timestamped line on stdout and, with to_file, in experiments.log."""
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


# ------------------------------------------------------------------ subprocesses

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


def _subprocess_env(jobs):
    """This environment, with the package importable and TensorFlow quiet; with jobs > 1,
    the cores shared out between the cells running side by side."""
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if jobs > 1:
        env.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


def run_subprocess(module, args, cell_dir, label, timeout, jobs):
    """Run `python -m module args`, output appended to the cell's logs. Returns (ok, error)."""
    os.makedirs(cell_dir, exist_ok=True)
    env = _subprocess_env(jobs)
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
        finally:  # a stopped grid kills what is still in RUNNING (run_grid)
            with LOCK:
                RUNNING.discard(proc)
    if proc.returncode != 0:
        return False, f"exit status {proc.returncode}\n" + _tail(err_path)
    return True, ""


# ------------------------------------------------------------------ one cell

def run_cell(grid, row, seed, log, request):
    """Bring one cell to 'done' (or 'failed'); returns its status. request: the
    grid_spec.GridRequest (retry_failed, cell_timeout, jobs, the convergence rule)."""
    key = grid.key(row, seed)
    sig = grid.signature(row, seed)
    entry = grid.state["cells"].get(key, {})
    results = grid.results(row, seed)
    trained = (entry.get("status") == "done" and entry.get("signature") == sig
               and metric(results, "clean") is not None and metric(results, "pgd20") is not None)
    if entry.get("status") == "failed" and entry.get("signature") == sig \
            and not request.retry_failed:
        log(f"[{key}] failed before; skipped (--retry_failed=false)")
        return "failed"
    missing = extra_attacks_missing(grid, row, seed) if trained else list(grid.attacks[2:])
    if trained and not missing:
        log(f"[{key}] finished: skipped")
        return "done"

    start = time.time()
    entry = _start_entry(grid, row, seed, sig)
    ok, error = True, ""
    if not trained:
        ok, error = _train(grid, row, seed, log, request)
    if ok and missing and not STOP.is_set():
        ok, error = _evaluate_extra(grid, row, seed, missing, log, request)
    if STOP.is_set():  # killed with the grid: run_grid marks the cell interrupted
        return "interrupted"
    with LOCK:
        return _record_cell(grid, row, seed, entry, ok, error, start, log, request.rule)


def _start_entry(grid, row, seed, sig):
    """The cell's grid.json entry, saved as running."""
    entry = {"row": row["name"], "seed": seed, "workdir": grid.cell_dir(row, seed),
             "signature": sig, "status": "running",
             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with LOCK:
        grid.state["cells"][grid.key(row, seed)] = entry
        grid.save()
    return entry


def _train(grid, row, seed, log, request):
    """Train the cell (resuming its run if it has checkpoints). Returns (ok, error)."""
    key, cell_dir = grid.key(row, seed), grid.cell_dir(row, seed)
    resuming = os.path.isdir(os.path.join(cell_dir, "checkpoints"))
    log(f"[{key}] training{' (resuming)' if resuming else ''}: python -m keras_arat.train "
        + " ".join(grid.train_args(row, seed)))
    return run_subprocess("keras_arat.train", grid.train_args(row, seed), cell_dir,
                          "train", request.cell_timeout, request.jobs)


def _evaluate_extra(grid, row, seed, missing, log, request):
    """Run keras_arat.evaluate for the missing attacks. Returns (ok, error)."""
    key, cell_dir = grid.key(row, seed), grid.cell_dir(row, seed)
    # The training's own test images, eps, checkpoint, seed and batches; each extra
    # figure is its attack alone, as the trainer's clean and PGD-20 are.
    results = grid.results(row, seed) or {}
    cfg = config.read_config(cell_dir)
    args = [f"--workdir={cell_dir}", f"--attacks=clean,{','.join(missing)}",
            "--branch=adv", f"--n_examples={results.get('n_examples')}",
            f"--checkpoint={os.path.basename(results.get('checkpoint', 'latest'))}",
            f"--seed={cfg.seed}", f"--batch_size={cfg.eval_batch_size}",
            "--noprogress"]
    log(f"[{key}] evaluating {','.join(missing)}: python -m keras_arat.evaluate "
        + " ".join(args))
    return run_subprocess("keras_arat.evaluate", args, cell_dir, "evaluate",
                          request.cell_timeout, request.jobs)


def _record_cell(grid, row, seed, entry, ok, error, start, log, rule):
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
        converged, why = verdict(figures, rule)
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


# ------------------------------------------------------------------ the whole grid

def run_grid(grid, request, log):
    """Run every cell, request.jobs at a time; returns {cell key: status}. Raises
    Interrupted when stopped (Ctrl-C, or `kill PID`)."""
    total = len(grid.rows) * len(grid.seeds)
    log(f"grid {grid.workdir}: {len(grid.rows)} rows x {len(grid.seeds)} seeds = {total} "
        f"cells; attacks {','.join(grid.attacks)}"
        + (f"; {request.jobs} cells at a time" if request.jobs > 1 else ""))
    start = time.time()
    _stop_on_signals()
    statuses = _run_cells(grid, request, log)
    grid.save()
    _log_finished(grid, statuses, total, start, log)
    return statuses


def _stop_on_signals():
    def _stop(signum, frame):  # `kill PID` stops the grid like Ctrl-C: the cell's
        raise KeyboardInterrupt  # subprocess is stopped and the cell marked interrupted

    signal.signal(signal.SIGTERM, _stop)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # started with `&` by a shell
        signal.signal(signal.SIGINT, _stop)


def _run_cells(grid, request, log):
    pool = futures.ThreadPoolExecutor(request.jobs)
    cells = {grid.key(row, seed): pool.submit(run_cell, grid, row, seed, log, request)
             for row, seed in grid.cells()}
    statuses = {}
    try:
        for key, cell in cells.items():
            statuses[key] = cell.result()
    except KeyboardInterrupt:
        _stop_cells(grid, pool, cells, log)
        raise Interrupted from None
    pool.shutdown()
    return statuses


def _stop_cells(grid, pool, cells, log):
    """Kill the running subprocesses, wait for their cells, mark them interrupted."""
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


def _log_finished(grid, statuses, total, start, log):
    failed = sorted(k for k, v in statuses.items() if v != "done")
    below = sorted(k for k, v in statuses.items() if v == "done"
                   and grid.state["cells"][k].get("converged") is False)
    log(f"grid finished in {time.time() - start:.0f} s: {total - len(failed)} done, "
        f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
        f"{len(below)} done but FAILED the convergence rule"
        f"{': ' + ', '.join(below) if below else ''}")
