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

import dataclasses
import sys

from absl import app, flags

from keras_arat import errors, grid_report, grid_runner, grid_spec, train_flags

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


def grid_request():
    """The grid the flags ask for (checked by grid_spec.build_grid)."""
    return grid_spec.GridRequest(**{field.name: getattr(FLAGS, field.name)
                                    for field in dataclasses.fields(grid_spec.GridRequest)})


def open_grid(request):
    """(Grid, log) from the request; a bad setting is one `error:` line and exit status 2."""
    try:
        base, shared, rows, seeds = grid_spec.build_grid(request)
        log = grid_runner.make_logger(request.workdir, to_file=not FLAGS.dry_run)
        attacks = grid_spec.resolve_attacks(request.attacks, log)
    except errors.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {e.strerror or e} ({getattr(e, 'filename', '') or ''})", file=sys.stderr)
        sys.exit(2)
    return grid_runner.Grid(request.workdir, base, shared, rows, seeds, attacks), log


def main(argv):
    del argv  # train_flags.parse_flags refused any positional argument
    request = grid_request()
    grid, log = open_grid(request)
    if FLAGS.dry_run:
        for command in grid_runner.train_commands(grid):
            print(command)
        return
    statuses = {}
    if not FLAGS.report_only:
        try:
            statuses = grid_runner.run_grid(grid, request, log)
        except grid_runner.Interrupted:
            sys.exit(130)
    md_path = grid_report.write_report(grid, request.rule, request.compare_to, log)
    with open(md_path) as f:
        print(f.read(), end="")
    if any(v != "done" for v in statuses.values()):
        sys.exit(1)


def run_main():
    define_flags()
    app.run(main, argv=train_flags.resolve_flagfiles(sys.argv), flags_parser=train_flags.parse_flags)


# The grid's library names this module held before grid_spec, grid_figures, grid_runner
# and grid_report took them over (imported on first use, with a DeprecationWarning).
_MOVED_TO = ("grid_spec", "grid_figures", "grid_runner", "grid_report")


def __getattr__(name):
    import importlib
    import warnings
    if not name.startswith("_"):
        for module in _MOVED_TO:
            found = importlib.import_module(f"keras_arat.{module}")
            if hasattr(found, name):
                warnings.warn(f"keras_arat.experiments.{name} moved to keras_arat.{module}."
                              f"{name}", DeprecationWarning, stacklevel=2)
                return getattr(found, name)
    raise AttributeError(f"module 'keras_arat.experiments' has no attribute {name!r}")


if __name__ == "__main__":
    run_main()
