"""Median train-step time of PGD-AT, ARAT and TRADES side by side, in one process.

    python benchmarks/step_time.py --model=small_cnn --batch_size=128
    python benchmarks/step_time.py --model=resnet18 --batch_size=32 --steps=5 \
        --image_shape=32,32,3

Same model family, batch, attack (PGD-10 unless --attack_steps) and data for each
method; the first --warmup steps (tracing) are not timed, and the timed steps are
taken in rounds (one step of each method per round) so that a change in the machine's
speed affects every method alike. "arat" is ARAT with --joint_pass=true (clean and
adversarial halves as one batch); "arat_two_pass" is ARAT's default, two passes. --image_shape replaces the digits with
random images of that shape (e.g. CIFAR's 32,32,3). Also prints the input pipeline's
images/s. Figures go to BENCHMARKS.md.
"""

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class Timed:
    """A tf.function timed like a train step (train_on_batch's interface)."""

    def __init__(self, fn):
        self.fn = fn

    def train_on_batch(self, xb, yb, return_dict=True):
        import tensorflow as tf
        return {"loss": tf.reduce_sum(self.fn(xb, yb))}


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--cnn_width", type=int, default=16)
    parser.add_argument("--wrn_depth", type=int, default=34)
    parser.add_argument("--wrn_width", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--attack_steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default="pgd_at,arat,trades")
    parser.add_argument("--jit_compile", action="store_true")
    parser.add_argument("--mixed_precision", default="off",
                        choices=["off", "bfloat16", "float16"])
    parser.add_argument("--image_shape", default="",
                        help="e.g. 32,32,3: time on random images of this shape")
    return parser.parse_args()


def one_batch(args, data):
    """(x, y, image shape): a batch of digits, or random images of --image_shape."""
    import tensorflow as tf

    from keras_arat.data import make_train_dataset
    dataset, _ = make_train_dataset(data, args.batch_size, 1, seed=0)
    x, y = next(iter(dataset))
    image_shape = data.image_shape
    if args.image_shape:
        image_shape = tuple(int(d) for d in args.image_shape.split(","))
        x = tf.random.stateless_uniform((args.batch_size, *image_shape), seed=[0, 1])
    return x, y, image_shape


def pipeline_speed(args, data):
    """Images/s of the input pipeline alone: a full epoch of augmented batches, after one
    warm-up batch."""
    from keras_arat.data import make_train_dataset
    ds, steps = make_train_dataset(data, args.batch_size, 2, seed=0)
    it = iter(ds)
    next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * args.batch_size / (time.perf_counter() - start)


def make_trainers(args, data, image_shape):
    """{method: compiled trainer}, plus with pgd_at its attack alone ("attack_only") and
    evaluation's PGD-20 ("pgd20_eval"), each timed as a step."""
    import keras
    import tensorflow as tf

    from keras_arat import config, runs
    from keras_arat.attacks import PGD
    from keras_arat.training import TorchSGD
    trainers = {}
    for method in args.methods.split(","):
        base = "arat" if method == "arat_two_pass" else method
        cfg = config.RunConfig(model=args.model, cnn_width=args.cnn_width,
                               wrn_depth=args.wrn_depth, wrn_width=args.wrn_width,
                               method=base, split_bn=base == "arat",
                               attack_steps=args.attack_steps,
                               joint_pass=method != "arat_two_pass")
        keras.utils.set_random_seed(0)
        network = runs.build_network(cfg, data.num_classes, image_shape)
        trainer = runs.build_trainer(cfg, network, image_shape)
        trainer.compile(optimizer=TorchSGD(0.01), jit_compile=args.jit_compile)
        trainers[method] = trainer
    if "pgd_at" in trainers:
        # PGD-AT's attack alone (ARAT's is the same attack on the same branch and mode):
        # the rest of a PGD-AT step is one training pass over the batch.
        attack = tf.function(lambda xb, yb: trainers["pgd_at"].adversarial(xb, yb),
                             jit_compile=args.jit_compile)
        trainers["attack_only"] = Timed(attack)
        # Evaluation's PGD-20 (inference-mode BN, step eps/4), as keras_arat.evaluate runs it.
        net = trainers["pgd_at"].network
        pgd20 = PGD(eps=8 / 255, step_size=2 / 255, steps=20)
        trainers["pgd20_eval"] = Timed(tf.function(lambda xb, yb: pgd20(
            lambda z: net(z, training=False, branch="adv"), xb, yb,
            tf.constant([0, 0], tf.int64))))
    return trainers


def time_in_rounds(trainers, x, y, warmup, rounds):
    """{method: [seconds per step]}: warm-up steps first (not timed), then rounds of one
    step of each method, so a change in the machine's speed affects every method alike."""
    def step(trainer):
        start = time.perf_counter()
        logs = trainer.train_on_batch(x, y, return_dict=True)
        float(logs["loss"])  # wait for the step
        return time.perf_counter() - start

    for trainer in trainers.values():
        for _ in range(warmup):
            step(trainer)
    times = {method: [] for method in trainers}
    for _ in range(rounds):
        for method, trainer in trainers.items():
            times[method].append(step(trainer))
    return times


def report(args, times, pipeline_ips):
    """Each method's median step, then the ratios to PGD-AT and the pass-count floor."""
    medians = {}
    for method, ts in times.items():
        medians[method] = statistics.median(ts)
        print(f"{method:13s} median step {medians[method] * 1000:8.1f} ms  "
              f"{args.batch_size / medians[method]:8.1f} images/s  "
              f"(min {min(ts) * 1000:.1f}, max {max(ts) * 1000:.1f} ms, "
              f"{len(ts)} steps)")
    attack_time = medians.pop("attack_only", None)
    eval_time = medians.pop("pgd20_eval", None)
    if eval_time is not None:
        print(f"evaluation PGD-20 (inference mode): {args.batch_size / eval_time:.1f} images/s")
    if "pgd_at" in medians:
        for method, t in medians.items():
            if method != "pgd_at":
                print(f"ratio {method}/pgd_at: {t / medians['pgd_at']:.3f}")
        # ARAT = the same attack + one training pass over twice the batch (clean and
        # adversarial halves) + the small predictors: its floor when nothing is wasted.
        train_pass = medians["pgd_at"] - attack_time
        print(f"PGD-{args.attack_steps} attack alone {attack_time * 1000:.1f} ms "
              f"({attack_time / args.attack_steps * 1000:.1f} ms an iteration); one "
              f"training pass {train_pass * 1000:.1f} ms "
              f"= {train_pass / (attack_time / args.attack_steps):.2f} attack iterations")
        print(f"pass-count floor of arat/pgd_at (attack + 2 training passes over attack + "
              f"1): {(attack_time + 2 * train_pass) / medians['pgd_at']:.3f}")
    slowest = max(medians.values())
    print(f"pipeline / slowest training step throughput: "
          f"{pipeline_ips / (args.batch_size / slowest):,.0f}x")


def main():
    args = parse_args()
    from keras_arat import quiet
    quiet.import_tensorflow()  # without its start-up log (KERAS_ARAT_VERBOSE=1 shows it)

    import keras
    import tensorflow as tf

    from keras_arat.data import load_dataset
    data = load_dataset("digits")
    x, y, image_shape = one_batch(args, data)
    if args.mixed_precision != "off":
        keras.mixed_precision.set_dtype_policy(f"mixed_{args.mixed_precision}")
    pipeline_ips = pipeline_speed(args, data)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, TF {tf.__version__}, "
          f"keras {keras.__version__}, GPUs: {len(tf.config.list_physical_devices('GPU'))}")
    print(f"model {args.model} batch {args.batch_size} input {tuple(x.shape[1:])} "
          f"PGD-{args.attack_steps} jit_compile={args.jit_compile} "
          f"mixed_precision={args.mixed_precision}")
    print(f"input pipeline: {pipeline_ips:,.0f} images/s (crop+flip, digits)")
    trainers = make_trainers(args, data, image_shape)
    report(args, time_in_rounds(trainers, x, y, args.warmup, args.steps), pipeline_ips)


if __name__ == "__main__":
    main()
