"""Evaluation throughput: PGD-20, CW and AutoAttack per stage, seconds and images/s.

    python benchmarks/eval_throughput.py [--workdir=runs/quickstart] [--n_examples=200]
    python benchmarks/eval_throughput.py --saved_model=DIR --eps=0.25 --n_examples=200
    python benchmarks/eval_throughput.py --model=resnet18 --n_examples=8 --batch_size=8
    python benchmarks/eval_throughput.py --train [--workdir=runs/quickstart_bench_eval]

The model is one of: a training run (--workdir, its adv branch by default, at the run's
eps), an exported SavedModel (--saved_model, on the embedded test digits), or a model of
keras_arat.models with random weights (--model, e.g. resnet18 in CIFAR shape; labels are
its own clean predictions, so every image is attacked by every stage). --train trains
configs/quickstart.flags into --workdir in this process first.

Prints clean, PGD-20 and CW accuracy with their time, then AutoAttack ("standard":
APGD-CE, APGD-T, FAB-T, Square 5000; run on its own, as RobustBench reports it) stage
by stage: robust accuracy after it, points broken, images attacked, seconds, images/s.
--n_iter, --n_queries and --n_target_classes shrink AutoAttack (tests use tiny budgets;
the defaults are the standard version). --square_rescale_schedule reads Square's window
schedule as if the budget were 10,000 queries, as torchattacks' AutoAttack does (windows
shrink earlier; not the standard version), to run a reference's own settings. The
AutoAttack line names any setting that is not the standard version's. --robust_out=
FILE.npy writes the per-example verdicts (still correct after AutoAttack). Nothing else
is written.

Square makes forward passes only, so it may query a faster runtime of the same model:
--query_onnx=auto (default) uses onnxruntime on the model.onnx export wrote beside
--saved_model, convert converts the model in memory with tf2onnx (any source), none
queries the TensorFlow model, or give a file. Its logits are checked against the
model's; the verdicts are always the TensorFlow model's.

The model's share: just before AutoAttack it times the model alone, a forward pass and a
forward pass with its input gradient (and a forward pass of the query runtime), each
--model_passes times in one traced loop on (up to a batch of) the correctly classified
images, and prints per stage the model time its budget implies (APGD: iterations x
targets x gradient passes; FAB-T: the same with a gradient and a forward pass per
iteration; Square: queries x forward passes of the runtime it queries) for the images it
attacked. An estimate, not a bound: the stages run on other batch sizes (fewer images as
points break) and later, and a CPU's speed per image varies with both.
"""

import argparse
import dataclasses
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def train_quickstart(workdir):
    """Train configs/quickstart.flags into workdir; return the Run holding the live network."""
    from absl import flags
    from keras_arat import config, results, train, train_flags
    captured = {}
    original = results.update_results

    def capture(workdir_, run, *a, **k):
        captured["run"] = run
        return original(workdir_, run, *a, **k)

    argv = train_flags.resolve_flagfiles(["train", "--flagfile=configs/quickstart.flags",
                                   f"--workdir={workdir}", "--verbose=2", "--overwrite"])
    flags.FLAGS(argv)
    cfg = config.config_from_flags(flags.FLAGS, train.TRAIN_FLAGS)
    results.update_results = capture
    try:
        start = time.time()
        train.train(cfg)
    finally:
        results.update_results = original
    print(f"trained the quickstart in {time.time() - start:.0f} s", flush=True)
    return captured["run"]


def load_model(args):
    """(model_fn, x, y, eps, description) for the chosen source."""
    import numpy as np
    from keras_arat import runs
    if args.model:
        from keras_arat.data.datasets import load_dataset
        from keras_arat.models import build_model
        import keras
        keras.utils.set_random_seed(args.seed)
        kwargs = {"width": args.width} if args.model == "small_cnn" and args.width else {}
        net = build_model(args.model, num_classes=10, split_bn=False, **kwargs)
        data = load_dataset("digits", n_train=1, n_test=args.n_examples)
        x = data.x_test[:args.n_examples].astype("float32") / 255.0

        def model_fn(z):
            return net(z, training=False)

        from keras_arat.attacks.autoattack import predict_labels
        y = predict_labels(model_fn, x, args.batch_size)  # random weights: attack every image
        eps = float(args.eps or 8 / 255)
        return model_fn, x, y, eps, (f"{args.model} (random weights, labels = its "
                                     f"predictions) on digits")
    if args.saved_model:
        from keras_arat.data.datasets import load_dataset
        from keras_arat.deployed import SavedModelRunner
        data = load_dataset("digits", n_train=1, n_test=args.n_examples)
        x = data.x_test[:args.n_examples].astype("float32") / 255.0
        y = np.asarray(data.y_test[:args.n_examples])
        return (SavedModelRunner(args.saved_model), x, y, float(args.eps or 8 / 255),
                f"SavedModel {args.saved_model} on digits")
    run = train_quickstart(args.workdir) if args.train else runs.load_run(args.workdir)
    x, y = run.test_arrays(args.n_examples)
    net = run.network

    def model_fn(z):
        return net(z, training=False, branch=args.branch)

    cfg = run.config
    return (model_fn, x, y, float(args.eps or cfg.eps),
            f"run {args.workdir}: {cfg.method} {cfg.model} (width "
            f"{cfg.cnn_width}) on {cfg.dataset}, epoch {run.epoch}, branch "
            f"{args.branch}")


def query_model(args, model_fn, x):
    """(query_fn or None, what Square queries) for --query_onnx."""
    from keras_arat.deployed import query_runner
    start = time.time()
    runner, what = query_runner(args.query_onnx, args.saved_model, model_fn, x.shape[1:])
    if runner is None:
        return None, what
    if args.query_onnx == "convert":
        what += f" ({time.time() - start:.1f} s)"
    return runner.as_tf(), f"{what} with onnxruntime"


def model_cost(model_fn, x, passes, gradients=True):
    """(forward, forward + input gradient) seconds per image, each timed over `passes`
    passes of the whole batch x in one traced loop (traced and run once before timing);
    gradients=False: the forward pass only, (forward, None)."""
    import tensorflow as tf
    x = tf.constant(x)

    def loop(with_grad):
        def body(i, total):
            z = x + tf.cast(i, x.dtype) * 1e-7  # a new input each pass
            if not with_grad:
                return i + 1, total + tf.reduce_sum(model_fn(z))
            with tf.GradientTape() as tape:
                tape.watch(z)
                out = tf.reduce_sum(model_fn(z)[:, 0])
            return i + 1, total + tf.reduce_sum(tape.gradient(out, z))
        return tf.function(lambda: tf.while_loop(lambda i, _: i < passes, body,
                                                 (tf.constant(0), tf.constant(0.0)))[1])

    per_image = []
    for with_grad in (False, True)[:2 if gradients else 1]:
        fn = loop(with_grad)
        fn()
        start = time.perf_counter()
        fn().numpy()
        per_image.append((time.perf_counter() - start) / passes / len(x))
    return tuple(per_image) if gradients else (per_image[0], None)


def autoattack_for(args, eps):
    """The AutoAttack the flags ask for (the standard version by default)."""
    from keras_arat.attacks import AutoAttack
    aa = AutoAttack(eps=eps, n_iter=args.n_iter, n_queries=args.n_queries,
                    n_target_classes=args.n_target_classes)
    if args.square_rescale_schedule:
        aa.attacks[-1] = dataclasses.replace(aa.attacks[-1], rescale_schedule=True)
    return aa


def budget_label(aa):
    """'standard', or the settings in which AutoAttack `aa` differs from the standard
    version (AutoAttack's own defaults)."""
    standard = {f.name: f.default for f in dataclasses.fields(aa)}
    changed = [f"{getattr(aa, field)} {name}" for field, name in (
        ("n_iter", "iterations"), ("n_queries", "queries"), ("n_target_classes", "targets"))
        if getattr(aa, field) != standard[field]]
    if aa.attacks[-1].rescale_schedule:
        changed.append("Square's schedule rescaled")
    return "standard" if not changed else "(" + ", ".join(changed) + ")"


def stage_model_time(name, attacked, forward, gradient, query, n_iter, n_queries,
                     n_targets):
    """Seconds of model time a stage's budget implies, at the measured per-image costs."""
    if name == "apgd-ce":
        return attacked * n_iter * gradient
    if name == "apgd-t":
        return attacked * n_iter * n_targets * gradient
    if name == "fab-t":
        return attacked * n_iter * n_targets * (gradient + forward)
    if name == "square":
        return attacked * n_queries * query
    return 0.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "quickstart"))
    parser.add_argument("--saved_model", default=None)
    parser.add_argument("--model", default=None, help="random-weight keras_arat model")
    parser.add_argument("--width", type=int, default=None, help="small_cnn width")
    parser.add_argument("--eps", type=float, default=None)
    parser.add_argument("--n_examples", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--branch", default="adv", choices=["adv", "clean"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_iter", type=int, default=100)
    parser.add_argument("--n_queries", type=int, default=5000)
    parser.add_argument("--n_target_classes", type=int, default=9)
    parser.add_argument("--square_rescale_schedule", action="store_true",
                        help="Square's schedule as if n_queries were 10,000 (torchattacks')")
    parser.add_argument("--model_passes", type=int, default=50,
                        help="passes of the model alone timed for its share (0: not timed)")
    parser.add_argument("--query_onnx", default="auto",
                        help="what Square queries: auto, convert, none or an ONNX file")
    parser.add_argument("--robust_out", default=None, metavar="FILE.npy",
                        help="write the per-example verdicts (bool [n]: still correct)")
    parser.add_argument("--attacks", default="pgd20,cw,autoattack")
    parser.add_argument("--train", action="store_true",
                        help="train the quickstart in-process instead of loading --workdir")
    args = parser.parse_args()
    from keras_arat import quiet
    quiet.import_tensorflow()  # without its start-up log (KERAS_ARAT_VERBOSE=1 shows it)

    import numpy as np
    import tensorflow as tf
    from keras_arat.evaluation import evaluate_model_fn

    model_fn, x, y, eps, what = load_model(args)
    attacks = args.attacks.split(",")
    n = len(x)
    print(f"{what}; eps {eps:.4f} L-inf; {n} test images, batch {args.batch_size}; "
          f"TF {tf.__version__}, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()})", flush=True)
    for name in [a for a in attacks if a in ("pgd20", "cw")]:
        accs, _ = evaluate_model_fn(model_fn, x, y, eps, ("clean", name), args.batch_size,
                                    args.seed)
        seconds = accs[f"{name}_time_s"]
        print(f"clean acc {accs['clean']:.3f}; {name} acc {accs[name]:.3f} in "
              f"{seconds:.1f} s: {n / seconds:.1f} img/s", flush=True)
    if "autoattack" not in attacks:
        return
    query_fn, queried = query_model(args, model_fn, x)
    print(f"Square queries {queried}", flush=True)
    cost, n_targets = None, args.n_target_classes
    if args.model_passes > 0:
        from keras_arat.attacks.autoattack import predict_labels
        correct = x[predict_labels(model_fn, x, args.batch_size) == y][:args.batch_size]
        if len(correct):
            n_targets = min(n_targets, int(model_fn(tf.constant(correct[:1])).shape[-1]) - 1)
            forward, gradient = model_cost(model_fn, correct, args.model_passes)
            query = (model_cost(query_fn, correct, args.model_passes, gradients=False)[0]
                     if query_fn else forward)
            cost = (forward, gradient, query)
            print(f"model alone on {len(correct)} images: forward {forward * 1e3:.3f} ms, "
                  f"forward + input gradient {gradient * 1e3:.3f} ms, Square's query "
                  f"{query * 1e3:.3f} ms per image ({args.model_passes} passes each)",
                  flush=True)
    aa = autoattack_for(args, eps)
    start = time.time()
    result = aa.run(model_fn, x, y, batch_size=args.batch_size, seed=args.seed,
                    query_fn=query_fn)
    total = time.time() - start
    if args.robust_out:
        np.save(args.robust_out, result.robust)
    print(f"AutoAttack {budget_label(aa)} acc {result.robust_accuracy:.3f} in {total:.1f} s: "
          f"{n / total:.2f} img/s")
    print(f"{'stage':<8} {'robust acc':>10} {'broken':>7} {'attacked':>8} {'time s':>8} "
          f"{'img/s':>8}" + (f" {'model s':>8}" if cost else ""))
    attacked = n
    for s in result.stages:
        rate = attacked / s["time_s"] if s["time_s"] > 0 else float("inf")
        line = (f"{s['attack']:<8} {s['robust_acc']:>10.3f} {s['n_broken']:>7d} "
                f"{attacked:>8d} {s['time_s']:>8.1f} {rate:>8.2f}")
        if cost:
            seconds = stage_model_time(s["attack"], attacked, *cost, args.n_iter,
                                       args.n_queries, n_targets)
            line += f" {seconds:>8.3f}"
        print(line)
        attacked = int(round(s["robust_acc"] * n))  # the next stage attacks the survivors
    for w in result.warnings:
        print(f"WARNING: {w}")


if __name__ == "__main__":
    main()
