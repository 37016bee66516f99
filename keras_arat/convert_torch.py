"""Turn a PyTorch ResNet-18 / WRN state_dict (official AR-AT, PGD-AT, TRADES) into a run.

    python -m keras_arat.convert_torch --checkpoint=FILE --model=resnet18|wrn \
        [--num_classes=10] [--dataset=cifar10] [--method=arat|pgd_at|trades|mart] --workdir=OUT

FILE is a state_dict (.pt with torch installed, or .safetensors / .npz without); which
keys it must hold and how split-BN and plain checkpoints are told apart:
keras_arat.torch_weights, the library this command calls. OUT gets config.json and
checkpoints/epoch-NNNN in keras_arat's own format, so `python -m keras_arat.evaluate
--workdir=OUT` and `python -m export --workdir=OUT` take it as they take a training run.
"""

import sys

from keras_arat.torch_weights import (  # noqa: F401 - the library's names, as before
    MODELS, ConversionError, assign, build_network, convert, infer_wrn_shape, is_split_bn,
    predictor_map, read_state_dict, run_config, strip_prefixes, to_keras, to_torch,
    weight_map)


def run_main():
    """python -m keras_arat.convert_torch / keras-arat-convert-torch."""
    from absl import app, flags
    flags.DEFINE_string("checkpoint", None, "PyTorch state_dict: .pt (needs torch), "
                        ".safetensors or .npz.")
    flags.DEFINE_enum("model", None, list(MODELS), "Architecture of the checkpoint.")
    flags.DEFINE_integer("num_classes", None, "Classes (default: read from the checkpoint; "
                         "given, it must agree).")
    flags.DEFINE_string("dataset", "cifar10", "Data set the run evaluates on (config.json).")
    flags.DEFINE_enum("method", None, ["arat", "pgd_at", "trades", "mart", "standard"],
                      "Method recorded for the run (default: arat for split BN, pgd_at "
                      "for single BN).")
    flags.DEFINE_integer("epochs", 100, "Epoch number of the written checkpoint.")
    flags.DEFINE_string("workdir", None, "Run folder to write (must not exist).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --workdir.")

    def run(argv):
        from absl import logging
        logging.set_verbosity(logging.WARNING)
        f = flags.FLAGS
        try:
            for name in ("checkpoint", "model", "workdir"):
                if not f[name].value:
                    raise ConversionError(f"--{name} is required")
            convert(f.checkpoint, f.model, f.workdir, f.num_classes, f.dataset, f.method,
                    f.epochs, f.overwrite)
        except ConversionError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    from keras_arat import train_flags
    app.run(run, flags_parser=train_flags.parse_flags)


if __name__ == "__main__":
    run_main()
