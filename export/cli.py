"""python -m export: fold a trained run's BN branch and write SavedModel / ONNX / .keras.

    python -m export --workdir=RUN --out=OUT [--branch=adv|clean] [--name=NAME]
        [--formats=saved_model,onnx,keras] [--checkpoint=PATH] [--keras_model=FILE.keras]
        [--overwrite] [--opset=17] [--atol=1e-4] [--n_examples=1000] [--pgd_examples=N]

Everything is written into a temporary folder next to OUT and renamed to OUT only after
every check passed, so OUT is either complete or absent. Exit status: 0 success,
1 a check failed (parity above --atol, ONNX contract), 2 bad usage (one line on stderr).
"""

import os
import sys

from keras_arat.errors import UsageError

# The export itself is the library's (export.exporter); this module is its command line.
from .exporter import DEFAULT_ATOL, FORMATS, ExportCheckError, ExportRequest


def define_flags(flags):
    f = flags
    f.DEFINE_string("workdir", None, "Training run folder (config.json, checkpoints/).")
    f.DEFINE_string("out", None, "Output folder (must not exist unless --overwrite).")
    f.DEFINE_string("branch", "adv", "BN branch to fold: adv or clean.")
    f.DEFINE_string("name", None, "Model name for TF Serving (default: the run folder's "
                    "or .keras file's base name).")
    f.DEFINE_list("formats", list(FORMATS), f"Comma list from {FORMATS}.")
    f.DEFINE_string("checkpoint", None, "Which checkpoint of --workdir: latest (default), "
                    "best (--keep_best), swa, a name such as epoch-0003, or a folder.")
    f.DEFINE_string("keras_model", None, "Export this .keras network instead of a "
                    "checkpoint (--workdir, if given, still supplies test data and eps).")
    f.DEFINE_string("dataset", None, "Images for the checks instead of the run's test set "
                    "(digits without --workdir). A run whose data set is not on this machine "
                    "(e.g. one from keras_arat.convert_torch) is checked on random images in "
                    "[0,1] unless this is given; export_report.json's parity_data says which.")
    f.DEFINE_string("eps", None, "PGD budget when there is no --workdir (e.g. 8/255).")
    f.DEFINE_bool("overwrite", False, "Replace an existing --out.")
    f.DEFINE_integer("opset", 17, "ONNX opset.")
    f.DEFINE_float("atol", DEFAULT_ATOL, "Largest allowed absolute logit difference.")
    f.DEFINE_integer("n_examples", 1000, "Test images for the parity and accuracy checks.")
    f.DEFINE_integer("pgd_examples", None, "Test images for PGD-20 (default: --n_examples; "
                     "0 skips the attack).")
    f.DEFINE_integer("batch_size", 256, "Batch size of the checks.")
    f.DEFINE_integer("seed", 0, "Seed of PGD's random start (same for both models).")
    f.DEFINE_bool("verbose", False, "Show TensorFlow's start-up and C++ log lines "
                  "(hidden by default; also KERAS_ARAT_VERBOSE=1).")


def request_from(values):
    """The ExportRequest the parsed flags describe."""
    import dataclasses
    fields = {f.name for f in dataclasses.fields(ExportRequest)}
    request = {name: values[name].value for name in fields}
    request["formats"] = tuple(request["formats"])
    return ExportRequest(**request)


def main(argv=None):
    from absl import app, flags
    define_flags(flags)

    def run(args):
        import logging as pylogging

        from absl import logging
        logging.set_verbosity(logging.WARNING)
        pylogging.getLogger("tf2onnx").setLevel(pylogging.WARNING)
        try:
            request = request_from(flags.FLAGS)
            from .exporter import check_request, export_run
            check_request(request)  # before TensorFlow loads
            from keras_arat import quiet
            quiet.import_tensorflow(flags.FLAGS.verbose)
            export_run(**{f: getattr(request, f) for f in request.__dataclass_fields__})
        except UsageError as e:
            _fail(f"error: {_one_line(e)}", 2)
        except ExportCheckError as e:
            _fail(f"error: export check failed: {_one_line(e)}", 1)
        except Exception as e:  # anything else still ends in one line, nothing written
            if os.environ.get("EXPORT_DEBUG"):
                raise
            _fail(f"error: export failed: {type(e).__name__}: {_one_line(e)[:300]} "
                  f"(EXPORT_DEBUG=1 for the traceback)", 1)

    from keras_arat import train_flags
    app.run(run, argv=argv, flags_parser=train_flags.parse_flags)


def _fail(line, status):
    from absl import logging
    # A half-restored checkpoint logs pages of warnings when it is garbage collected.
    logging.set_verbosity(logging.FATAL)
    print(line, file=sys.stderr)
    sys.exit(status)


def _one_line(e):
    return " ".join(str(e).split())
