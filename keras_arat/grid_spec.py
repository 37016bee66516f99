"""A grid's description: rows, overrides, seeds, base flagfile and attacks, parsed and
checked against the trainer's flags before anything runs (python -m keras_arat.experiments).

Every error is a errors.UsageError naming the bad input; nothing here touches the grid's
folder."""

import dataclasses
import os
import re
from typing import Optional, Sequence

from absl import flags

from keras_arat import errors, train_flags

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# Cell settings the runner owns.
RESERVED = {"workdir", "seed", "flagfile", "overwrite", "resume"}
BUILTIN_ATTACKS = ("clean", "pgd20")  # the trainer's own final evaluation


@dataclasses.dataclass(frozen=True)
class ConvergenceRule:
    """The floors a cell that trained must reach to count (None: no floor)."""
    min_clean_acc: Optional[float] = None
    min_robust_acc: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class GridRequest:
    """The grid as the command was asked for it: its flags' values, not yet checked."""
    workdir: Optional[str]
    base_flagfile: Optional[str]
    rows: Sequence[str] = ()
    only_rows: Sequence[str] = ()
    seeds: Sequence[str] = ("0",)
    overrides: Sequence[str] = ()
    attacks: Sequence[str] = BUILTIN_ATTACKS
    min_clean_acc: Optional[float] = None
    min_robust_acc: Optional[float] = None
    compare_to: Optional[str] = None
    jobs: int = 1
    retry_failed: bool = True
    cell_timeout: Optional[int] = None

    @property
    def rule(self):
        return ConvergenceRule(self.min_clean_acc, self.min_robust_acc)


# ------------------------------------------------------------------ the trainer's flags

def train_flag_values():
    """A FlagValues holding the trainer's flags, to check keys and values of overrides."""
    fv = flags.FlagValues()

    class _Definer:
        def __getattr__(self, name):
            define = getattr(flags, name)
            return lambda *a, **k: define(*a, flag_values=fv, **k)

    train_flags.define_train_flags(_Definer())
    return fv


def _is_list_flag(flag):
    base = getattr(flags, "BaseListParser", flags.ListParser)
    return isinstance(flag.parser, base)


# ------------------------------------------------------------------ overrides and rows

def parse_overrides(text, where, fv, allow_recipe=False):
    """'k=v,k=v' -> [(k, v)], checked against the trainer's flags.

    allow_recipe: a row may name its own base flagfile, recipe=FILE (e.g. a baseline's
    own published hyper-parameters), used instead of --base_flagfile.
    """
    pairs = _split_pairs(text, where, fv, allow_recipe)
    _check_values(pairs, where, fv)
    return pairs


def _split_pairs(text, where, fv, allow_recipe):
    """'k=v,k=v' -> [(k, v)] with known keys; a piece without '=' continues a list flag."""
    pairs = []
    for piece in text.split(","):
        piece = piece.strip()
        if not piece:
            continue
        if "=" not in piece:
            if pairs and _is_list_flag(fv[pairs[-1][0]]):
                pairs[-1] = (pairs[-1][0], pairs[-1][1] + "," + piece)
                continue
            raise errors.UsageError(f"{where}: '{piece}' is not key=value")
        key, value = (s.strip() for s in piece.split("=", 1))
        key = key.lstrip("-")
        if key == "recipe" and allow_recipe:
            pairs.append((key, resolve_base_flagfile(value)))
            continue
        if key in RESERVED:
            raise errors.UsageError(f"{where}: {key} is set by the grid runner, not per row")
        if key not in fv:
            raise errors.UsageError(f"{where}: unknown training flag '{key}'")
        pairs.append((key, value))
    return pairs


def _check_values(pairs, where, fv):
    """Every value parses as its training flag; a recipe's lines are training flags."""
    for key, value in pairs:
        if key == "recipe":
            check_base_flagfile(value, fv)
            continue
        try:
            fv[key].parser.parse(value)
        except (ValueError, TypeError) as e:
            raise errors.UsageError(f"{where}: --{key}={value}: {e}") from None


def parse_rows(values, fv):
    """--rows values -> [{"name", "overrides": [(k, v)]}] in order."""
    rows, seen = [], set()
    for value in values:
        for text in value.split(";"):
            text = text.strip()
            if not text:
                continue
            rows.append(_parse_row(text, seen, fv))
    if not rows:
        raise errors.UsageError("no rows: pass --rows=NAME:key=value,... (see the module doc)")
    return rows


def _parse_row(text, seen, fv):
    """'NAME:key=value,...' -> {"name", "overrides"[, "recipe"]}; adds NAME to seen."""
    if ":" not in text:
        raise errors.UsageError(f"row '{text}' has no ':' (write NAME:key=value,...)")
    name, spec = (s.strip() for s in text.split(":", 1))
    if not NAME_RE.match(name):
        raise errors.UsageError(f"row name '{name}' must match {NAME_RE.pattern}")
    if name in seen:
        raise errors.UsageError(f"row name '{name}' is used twice")
    seen.add(name)
    pairs = parse_overrides(spec, f"row {name}", fv, allow_recipe=True)
    recipe = [v for k, v in pairs if k == "recipe"]
    row = {"name": name, "overrides": [(k, v) for k, v in pairs if k != "recipe"]}
    if recipe:
        row["recipe"] = recipe[-1]
    return row


def select_rows(rows, only_rows):
    """The rows named in only_rows (all when it is empty), in the order of rows."""
    if not only_rows:
        return rows
    names = [r["name"] for r in rows]
    unknown = [n for n in only_rows if n not in names]
    if unknown:
        raise errors.UsageError(f"--only_rows: no row named {', '.join(unknown)} (rows: "
                              f"{', '.join(names)})")
    return [r for r in rows if r["name"] in only_rows]


def parse_seeds(values):
    try:
        seeds = [int(s) for s in values if str(s).strip()]
    except ValueError:
        raise errors.UsageError(f"--seeds must be integers, got {','.join(values)}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise errors.UsageError("--seeds must list at least one seed, each once")
    return seeds


# ------------------------------------------------------------------ base flagfiles

def resolve_base_flagfile(path):
    if not path:
        raise errors.UsageError("--base_flagfile is required (the training settings of every "
                              "cell, e.g. configs/quickstart.flags)")
    if not os.path.exists(path):
        candidate = os.path.join(train_flags.CONFIGS_DIR, os.path.basename(path))
        if not os.path.exists(candidate):
            raise errors.UsageError(f"base flagfile {path} not found (looked in the current "
                                  f"directory and in {train_flags.CONFIGS_DIR})")
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
                raise errors.UsageError(f"{path}:{number}: unknown training flag '{key}'")


# ------------------------------------------------------------------ attacks

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
            raise errors.UsageError(f"unknown attack '{name}'; choose from "
                                  f"{list(dict.fromkeys(BUILTIN_ATTACKS + available))}")
    return list(BUILTIN_ATTACKS) + kept


# ------------------------------------------------------------------ the whole grid

def build_grid(request):
    """A GridRequest -> (base flagfile, shared overrides, rows, seeds), every setting
    checked (attacks apart: resolve_attacks, which may log a warning)."""
    if not request.workdir:
        raise errors.UsageError("--workdir is required (the grid's folder)")
    fv = train_flag_values()
    base = resolve_base_flagfile(request.base_flagfile)
    check_base_flagfile(base, fv)
    shared = []
    for value in request.overrides:
        shared += parse_overrides(value, "--overrides", fv)
    rows = select_rows(parse_rows(request.rows, fv), request.only_rows)
    seeds = parse_seeds(request.seeds)
    _check_settings(request, rows)
    return base, shared, rows, seeds


def _check_settings(request, rows):
    """The convergence floors, the reference row, the timeout and the job count."""
    for name in ("min_clean_acc", "min_robust_acc"):
        value = getattr(request, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise errors.UsageError(f"--{name} must be a fraction in [0, 1], got {value}")
    if request.compare_to and request.compare_to not in [r["name"] for r in rows]:
        raise errors.UsageError(f"--compare_to={request.compare_to} is not a row (rows: "
                              f"{', '.join(r['name'] for r in rows)})")
    if request.cell_timeout is not None and request.cell_timeout < 1:
        raise errors.UsageError("--cell_timeout must be >= 1")
    if request.jobs < 1:
        raise errors.UsageError(f"--jobs must be >= 1, got {request.jobs}")
