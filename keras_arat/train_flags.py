"""keras_arat.train's flags: their definitions, flagfiles and parsing.

The training command line, the grid runner (which checks a row's keys against these
flags) and the preflight all read the flags from here; config.config_from_flags turns
their values into a validated RunConfig.
"""

import os
import sys

from keras_arat.config import METHODS

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The flagfiles: installed as keras_arat/configs (pyproject.toml maps configs/ there); in a
# checkout or an editable install, the repository's configs/ beside the package.
CONFIGS_DIR = next((d for d in (os.path.join(_PACKAGE_DIR, "configs"),
                                os.path.join(os.path.dirname(_PACKAGE_DIR), "configs"))
                    if os.path.isdir(d)), os.path.join(os.path.dirname(_PACKAGE_DIR), "configs"))


def resolve_flagfiles(argv):
    """Let `--flagfile=cifar.flags` find configs/cifar.flags; fail early if absent."""
    out = []
    for arg in argv:
        if arg.startswith("--flagfile="):
            path = arg.split("=", 1)[1]
            if not os.path.exists(path):
                candidate = os.path.join(CONFIGS_DIR, os.path.basename(path))
                if os.path.exists(candidate):
                    path = candidate
                else:
                    print(f"error: flagfile {path} not found (looked in the current "
                          f"directory and in {CONFIGS_DIR})", file=sys.stderr)
                    sys.exit(2)
            arg = f"--flagfile={path}"
        out.append(arg)
    return out


def parse_flags(argv):
    """absl's flag parsing with one `error:` line (exit 2) instead of its two FATAL lines;
    the commands take flags only, so a positional argument is such an error too."""
    from absl import flags
    try:
        rest = flags.FLAGS(argv)
    except SystemExit as e:  # absl exits 1 after printing --help: asked for, not an error
        help_flags = {"--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml"}
        sys.exit(0 if e.code == 1 and help_flags & set(argv) else e.code)
    except flags.Error as e:
        files = [a.split("=", 1)[1] for a in argv if a.startswith("--flagfile=")]
        where = f" (flags from {', '.join(files)} and the command line)" if files else ""
        print(f"error: {e}{where}", file=sys.stderr)
        sys.exit(2)
    if len(rest) > 1:
        print(f"error: unexpected arguments {rest[1:]} (flags are --name=value)",
              file=sys.stderr)
        sys.exit(2)
    return rest


def define_train_flags(flags):
    f = flags
    f.DEFINE_string("dataset", "digits", "digits (embedded), cifar10, cifar100, svhn_cropped, "
                    "mnist, or npz:/path/file.npz")
    f.DEFINE_string("data_dir", None, "tfds data directory.")
    f.DEFINE_bool("download", False, "Let tfds download and prepare an absent data set.")
    f.DEFINE_integer("n_train", None, "Use only the first N training images.")
    f.DEFINE_integer("n_test", None, "Use only the first N test images.")
    f.DEFINE_string("model", "small_cnn", "small_cnn, resnet18, preact_resnet18, wrn.")
    f.DEFINE_integer("wrn_depth", 34, "WRN depth (model=wrn).")
    f.DEFINE_integer("wrn_width", 10, "WRN widen factor (model=wrn).")
    f.DEFINE_integer("cnn_width", 32, "Channels of the small CNN's first conv.")
    f.DEFINE_integer("cnn_stem_stride", 1, "Stride of the small CNN's first conv: 2 halves "
                     "the resolution of every later layer (about 3x less compute).")
    f.DEFINE_enum("method", "arat", list(METHODS), "Training method.")
    f.DEFINE_integer("epochs", 100, "Number of epochs.")
    f.DEFINE_integer("batch_size", 128, "Global batch size.")
    f.DEFINE_list("lr_values", ["0.02", "0.1", "0.01", "0.001"], "Learning rate per segment.")
    f.DEFINE_list("lr_boundaries", ["1", "76", "91"],
                  "Epoch counts after which the next lr value starts.")
    f.DEFINE_float("momentum", 0.9, "SGD momentum.")
    f.DEFINE_float("weight_decay", 5e-4, "Coupled (PyTorch-style) L2 weight decay.")
    f.DEFINE_string("eps", "8/255", "L-inf budget, in [0,1] pixel units (e.g. 8/255).")
    f.DEFINE_string("step_size", "2/255", "PGD step size.")
    f.DEFINE_integer("attack_steps", 10, "PGD steps during training.")
    f.DEFINE_enum("attack_bn", "default", ["default", "train", "inference"], "BN mode of "
                  "the network while the training attack runs: default is each method's "
                  "reference choice (ARAT and PGD-AT: train, batch statistics; TRADES and "
                  "MART: inference, moving statistics).")
    f.DEFINE_float("eps_warmup_epochs", 0.0, "Grow the training attack's eps and step size "
                   "linearly per optimiser step from 0 to --eps/--step_size over this many "
                   "epochs (fractions allowed; 0: full eps from the first step). Evaluation "
                   "always uses the full eps.")
    f.DEFINE_float("invariance_weight", None, "ARAT gamma (default: the model's).")
    f.DEFINE_enum("invariance", "asymmetric", ["asymmetric", "symmetric", "none"],
                  "ARAT invariance loss.")
    f.DEFINE_bool("predictor", None, "ARAT predictor heads on the adversarial features. "
                  "Default: as the official code, with --invariance=asymmetric, not with "
                  "symmetric (--predictor with symmetric is a variant of keras_arat's, not "
                  "in the official code).")
    f.DEFINE_float("beta", None, "TRADES / MART regularisation weight (default 6 / 5).")
    f.DEFINE_bool("split_bn", True, "Split BN (ARAT only; baselines use one BN).")
    f.DEFINE_list("align_layers", [], "Tapped layers for the invariance loss "
                  "(default: the model's).")
    f.DEFINE_integer("a_prev_examples", 1000, "ARAT's a_prev is measured at each epoch "
                     "start on whole augmented training batches of a new shuffle until at "
                     "least this many images (the official code's 1,000: 1,024 at batch "
                     "128).")
    f.DEFINE_bool("swa", False, "ARAT+SWA: average weights from --swa_start_epoch, evaluate "
                  "the average after adv-branch BN re-estimation.")
    f.DEFINE_integer("swa_start_epoch", 76, "First (1-based) epoch whose steps are averaged.")
    f.DEFINE_integer("swa_every_steps", 500, "Add the weights to the average every N steps.")
    f.DEFINE_integer("crop_padding", 4, "Random-crop padding (0 disables).")
    f.DEFINE_enum("flip", "auto", ["auto", "true", "false"], "Horizontal flips "
                  "(auto: on for CIFAR, off for digits).")
    f.DEFINE_integer("seed", 0, "Random seed.")
    f.DEFINE_string("workdir", None, "Run folder.")
    f.DEFINE_bool("resume", True, "Continue from the workdir's last complete checkpoint.")
    f.DEFINE_bool("overwrite", False, "Start afresh in a workdir holding another run.")
    f.DEFINE_integer("eval_examples", None, "Test images for the final evaluation "
                     "(default: all).")
    f.DEFINE_integer("eval_batch_size", 256, "Batch size of the final evaluation.")
    f.DEFINE_integer("eval_every_epochs", 0, "Clean and PGD-20 accuracy (adv branch, full "
                     "eps) on a fixed subset every N epochs and after the last, to "
                     "metrics.jsonl and TensorBoard (test/); 0: off.")
    f.DEFINE_integer("eval_examples_during_training", 1000, "Images of that subset.")
    f.DEFINE_enum("eval_during_training_on", "test", ["test", "holdout"], "The subset: the "
                  "first N test images (as the reference code), or the last N training "
                  "images, held out of training.")
    f.DEFINE_enum("keep_best", "none", ["none", "pgd20", "clean"], "Also keep the checkpoint "
                  "with the best accuracy of the evaluations during training "
                  "(checkpoints/best-N; evaluate and export take --checkpoint=best).")
    f.DEFINE_bool("jit_compile", False, "XLA-compile the train step.")
    f.DEFINE_enum("mixed_precision", "off", ["off", "auto", "bfloat16", "float16"],
                  "Mixed-precision training (float32 weights, attacks' eps arithmetic and "
                  "logits): auto picks mixed_float16 on a GPU and float32 on a CPU; "
                  "bfloat16 forces mixed_bfloat16 (slower than float32 on the CPUs measured).")
    f.DEFINE_bool("reference_noise_leak", False, "ARAT: reproduce the official AR-AT "
                  "attack's in-place random start (the clean branch sees x + U(-eps, eps) "
                  "and the attack's ball is centred there, 2 eps wide around x), in training "
                  "and in the final PGD-20; off: clean x stays clean (README).")
    f.DEFINE_bool("joint_pass", False, "ARAT: run the clean and adversarial halves as one "
                  "batch through the split-BN network (the same computation as two passes up to "
                  "float rounding; not faster on the CPUs measured, see BENCHMARKS.md).")
    f.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                  "tf.distribute strategy: one device; MirroredStrategy (all local GPUs, "
                  "or --cpu_devices logical CPUs); or MultiWorkerMirroredStrategy over the "
                  "cluster in TF_CONFIG (run the same command on every worker; the chief "
                  "writes --workdir, which must be shared for resuming).")
    f.DEFINE_integer("cpu_devices", 0, "Split the CPU into N logical devices (for testing "
                     "multi-device training without GPUs); 0 leaves it alone.")
    f.DEFINE_enum("nan_policy", "stop", ["stop", "skip_batch"], "On a NaN/Inf loss: stop "
                  "(keeping the last good checkpoint) or skip the batch and count it.")
    f.DEFINE_bool("deterministic", False, "TensorFlow op determinism: a resumed run ends "
                  "with the same weights as an uninterrupted one (somewhat slower).")
    f.DEFINE_enum("verbose", "auto", ["auto", "0", "1", "2"], "Keras fit verbosity "
                  "(auto: progress bar on a terminal; otherwise a line per epoch, and "
                  "between them a progress line with ETA every KERAS_ARAT_PROGRESS_SECONDS, "
                  "default 10). TensorFlow's start-up log: KERAS_ARAT_VERBOSE=1.")
    f.DEFINE_integer("tensorboard_every_steps", 10, "Also write the training figures to "
                     "TensorBoard (train_steps/) every N optimiser steps, each the mean over "
                     "those N steps; 0: per epoch only.")


def train_flag_values(argv=None):
    """A fresh absl FlagValues holding keras_arat.train's flags (parsed from argv, a
    command line with the program name first, when given) and their names."""
    from absl import flags
    values = flags.FlagValues()

    class Definer:  # define_train_flags(flags) with every DEFINE_* going into `values`
        def __getattr__(self, name):
            define = getattr(flags, name)
            return lambda *args, **kwargs: define(*args, flag_values=values, **kwargs)

    define_train_flags(Definer())
    if argv is not None:
        values(argv)
    return values, list(values)
