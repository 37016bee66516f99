"""AutoAttack throughput and robust accuracy on a trained run (default: the quickstart).

    python -m keras_arat.train --flagfile=configs/quickstart.flags --workdir=runs/quickstart
    python benchmarks/eval_throughput.py [--workdir=runs/quickstart] [--n_examples=200]
    python benchmarks/eval_throughput.py --train [--workdir=runs/quickstart_bench_eval]

--train trains the quickstart (configs/quickstart.flags) in this process into --workdir
and evaluates the network it holds in memory, instead of restoring the run's checkpoint.

Prints clean, PGD-20 and AutoAttack ("standard": APGD-CE, APGD-T, FAB-T, Square 5000)
accuracy of the adv branch on the first N test images at the run's eps, the robust
accuracy and time after each AutoAttack stage, and the throughput in images/s.
Nothing is written to the run.
"""

import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def train_quickstart(workdir):
    """Train configs/quickstart.flags into workdir; return the Run holding the live network."""
    from absl import flags
    from keras_arat import runs, train
    captured = {}
    original = runs.update_results

    def capture(workdir_, run, *a, **k):
        captured["run"] = run
        return original(workdir_, run, *a, **k)

    argv = runs.resolve_flagfiles(["train", "--flagfile=configs/quickstart.flags",
                                   f"--workdir={workdir}", "--verbose=2", "--overwrite"])
    flags.FLAGS(argv)
    cfg = runs.config_from_flags(flags.FLAGS, train.TRAIN_FLAGS)
    runs.update_results = capture
    try:
        start = time.time()
        train.train(cfg)
    finally:
        runs.update_results = original
    print(f"trained the quickstart in {time.time() - start:.0f} s", flush=True)
    return captured["run"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "quickstart"))
    parser.add_argument("--n_examples", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=200)
    parser.add_argument("--branch", default="adv", choices=["adv", "clean"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", action="store_true",
                        help="train the quickstart in-process instead of loading --workdir")
    args = parser.parse_args()
    from keras_arat import quiet
    quiet.import_tensorflow()  # without its start-up log (KERAS_ARAT_VERBOSE=1 shows it)

    import tensorflow as tf
    from keras_arat import runs
    from keras_arat.attacks import AutoAttack
    from keras_arat.evaluate import evaluate_model_fn

    run = train_quickstart(args.workdir) if args.train else runs.load_run(args.workdir)
    x, y = run.test_arrays(args.n_examples)
    eps = run.config["eps"]
    net = run.network

    def model_fn(z):
        return net(z, training=False, branch=args.branch)

    print(f"run {args.workdir}: {run.config['method']} {run.config['model']} "
          f"(width {run.config.get('cnn_width')}) on {run.config['dataset']}, epoch {run.epoch}; "
          f"branch {args.branch}; eps {eps:.4f} L-inf; {len(x)} test images, batch "
          f"{args.batch_size}; TF {tf.__version__}, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()})", flush=True)
    start = time.time()
    accs, _ = evaluate_model_fn(model_fn, x, y, eps, ("clean", "pgd20"), args.batch_size,
                                args.seed)
    print(f"clean acc {accs['clean']:.3f}; PGD-20 acc {accs['pgd20']:.3f} "
          f"({accs['pgd20_time_s']:.1f} s, {len(x) / accs['pgd20_time_s']:.1f} img/s)",
          flush=True)
    # AutoAttack alone (not chained after PGD-20), as RobustBench reports it.
    start = time.time()
    result = AutoAttack(eps=eps).run(model_fn, x, y, batch_size=args.batch_size,
                                     seed=args.seed,
                                     log=lambda msg: print(f"  {msg}", flush=True))
    total = time.time() - start
    print(f"AutoAttack standard acc {result.robust_accuracy:.3f} in {total:.1f} s: "
          f"{len(x) / total:.2f} img/s")
    print(f"{'stage':<8} {'robust acc':>10} {'broken':>7} {'time s':>8}")
    for s in result.stages:
        print(f"{s['attack']:<8} {s['robust_acc']:>10.3f} {s['n_broken']:>7d} "
              f"{s['time_s']:>8.1f}")
    for w in result.warnings:
        print(f"WARNING: {w}")
    print(f"summary: clean {accs['clean']:.3f} >= PGD-20 {accs['pgd20']:.3f} vs AutoAttack "
          f"{result.robust_accuracy:.3f} (gap {accs['pgd20'] - result.robust_accuracy:+.3f})")


if __name__ == "__main__":
    main()
