"""Run the quickstart end to end, timed, and check it meets its targets.

    python benchmarks/quickstart.py [--workdir=runs/quickstart_bench] [--max_seconds=300]
        [--any keras_arat.train flag, e.g. --epochs=2]

Prints wall time, the accuracies from results.json and PASS/FAIL against the
targets (adv-branch clean >= 0.90, PGD-20 >= 0.70, at most 5 minutes); exits 1 on FAIL.
Other flags go to keras_arat.train after the flagfile's (the tests run it that way on a
test-size model).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "quickstart_bench"))
    parser.add_argument("--max_seconds", type=float, default=300)
    parser.add_argument("--min_clean", type=float, default=0.90)
    parser.add_argument("--min_pgd20", type=float, default=0.70)
    args, train_flags = parser.parse_known_args()
    if any(not a.startswith("--") for a in train_flags):
        parser.error(f"unexpected arguments {train_flags}: train flags are --name=value")
    shutil.rmtree(args.workdir, ignore_errors=True)
    start = time.time()
    subprocess.run([sys.executable, "-m", "keras_arat.train",
                    "--flagfile=configs/quickstart.flags", f"--workdir={args.workdir}",
                    "--verbose=2", *train_flags], cwd=ROOT, check=True)
    seconds = time.time() - start
    with open(os.path.join(args.workdir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
        epochs = [r for r in map(json.loads, f) if "epoch_time_s" in r]  # training epochs
    checks = {
        f"wall time {seconds:.0f} s <= {args.max_seconds:.0f} s": seconds <= args.max_seconds,
        f"adv-branch clean acc {results['clean_acc']:.3f} >= {args.min_clean}":
            results["clean_acc"] >= args.min_clean,
        f"adv-branch PGD-20 acc {results['pgd20_acc']:.3f} >= {args.min_pgd20} "
        f"(eps {results['eps']:.4f})": results["pgd20_acc"] >= args.min_pgd20,
    }
    print(f"quickstart: {len(epochs)} epochs, mean epoch time "
          f"{sum(e['epoch_time_s'] for e in epochs) / len(epochs):.1f} s, "
          f"clean-branch clean acc {results['clean_acc_clean_branch']:.3f}, "
          f"n_examples {results['n_examples']}")
    for text, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
