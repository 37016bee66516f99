"""Train a robust classifier (ARAT or a baseline) and evaluate it.

    python -m keras_arat.train --flagfile=configs/quickstart.flags --workdir=runs/quickstart

Writes RUN/config.json, metrics.jsonl, tensorboard/, checkpoints/ and results.json
(see README.md). Re-running the same command resumes from the last complete checkpoint.
All flags: python -m keras_arat.train --helpfull
"""

import errno
import json
import sys

from absl import app, flags, logging

from keras_arat import config, errors, train_flags
# The training library's names, as this module offered them before training_run held them.
from keras_arat.training_run import (  # noqa: F401
    Training, build, check_tf_config, evaluation_figures, final_evaluation, finish, fit,
    fit_verbosity, is_chief, make_strategy, prepare_workdir, split_holdout, start_line,
    train, training_batches, trim_metrics)

FLAGS = flags.FLAGS
_BEFORE = set(FLAGS)
train_flags.define_train_flags(flags)
TRAIN_FLAGS = sorted(set(FLAGS) - _BEFORE)


def check_before_tensorflow(cfg):
    """Data set and workdir, checked before TensorFlow loads (keras_arat.preflight)."""
    from keras_arat import preflight
    preflight.check_new_folder(cfg.workdir, "workdir")
    preflight.check_data(cfg.dataset, cfg.data_dir, cfg.n_train, cfg.n_test)


def main(argv):
    del argv  # train_flags.parse_flags refused any positional argument
    logging.set_verbosity(logging.WARNING)
    from keras_arat import quiet
    try:
        cfg = config.config_from_flags(FLAGS, TRAIN_FLAGS)
        check_before_tensorflow(cfg)
    except errors.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    quiet.import_tensorflow()
    from keras_arat.attacks import EvaluationError
    from keras_arat.training.callbacks import NonFiniteLossError
    try:
        figures = train(cfg)
    except errors.UsageError as e:  # flags, files, data, checkpoints
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except EvaluationError as e:  # e.g. a model whose weights went non-finite
        print(f"error: final evaluation: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        hint = ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            hint = ("; earlier checkpoints are intact: free space, then run the same command "
                    "again to resume")
        print(f"error: {e.strerror or e} ({getattr(e, 'filename', '') or ''}){hint}",
              file=sys.stderr)
        sys.exit(1)
    print(json.dumps(figures, indent=1), flush=True)


def run_main():
    app.run(main, argv=train_flags.resolve_flagfiles(sys.argv), flags_parser=train_flags.parse_flags)


if __name__ == "__main__":
    run_main()
