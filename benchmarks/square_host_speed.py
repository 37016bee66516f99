"""Square's host loop (L-inf, numpy queries): another version of square.py against this
tree's, timed alternately in one process.

    git show REV:keras_arat/attacks/square.py > /tmp/square_before.py
    python benchmarks/square_host_speed.py --before=/tmp/square_before.py [--reps=3]

Square(eps=0.25, n_queries=1000).host_call(query, x, y, seed) on 200 random 28x28x1
images; query is a small numpy model (linear, 784 -> 10, with a bias that keeps class 0
ahead by 0.4, so the points break gradually over the 1,000 queries). One warm-up call
each, then before/after alternately, --reps times each; prints every time and the medians.
Both versions must return the same points (checked).
numpy's BLAS runs on one thread (the machine has 2 cores and other jobs: its threads
waiting for a core made the model's time, and so the loop's, vary by several times).
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keras_arat.attacks import square as after  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--before", required=True, help="another version of square.py")
parser.add_argument("--reps", type=int, default=3)
args = parser.parse_args()
spec = importlib.util.spec_from_file_location("square_before", args.before)
before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(before)

rng = np.random.default_rng(0)
x = rng.uniform(0, 1, (200, 28, 28, 1)).astype(np.float32)
W = (rng.normal(0, 1, (784, 10)) / 221).astype(np.float32)
b = np.zeros(10, np.float32)
b[0] = 0.4
stats = {"images": 0, "seconds": 0.0}


def query(z):
    t = time.perf_counter()
    logits = z.reshape(len(z), -1) @ W + b
    stats["images"] += len(z)
    stats["seconds"] += time.perf_counter() - t
    return logits


y = np.argmax(query(x), 1)
seed = tf.constant([3, 0], tf.int64)


def run(module):
    stats.update(images=0, seconds=0.0)
    t = time.perf_counter()
    adv = module.Square(eps=0.25, n_queries=1000).host_call(query, x, y, seed)
    total = time.perf_counter() - t
    return adv, total, total - stats["seconds"], stats["images"]


results = {"before": [], "after": []}
advs = {}
for name, module in [("before", before), ("after", after)]:  # warm-up: traces the draws
    advs[name] = run(module)[0]
np.testing.assert_array_equal(advs["before"], advs["after"])
broken = int((np.argmax(query(advs["after"]), 1) != y).sum())
print(f"same points before and after; {broken} of {len(x)} broken")
for rep in range(args.reps):
    for name, module in ([("before", before), ("after", after)] if rep % 2 == 0 else
                         [("after", after), ("before", before)]):
        adv, total, loop, images = run(module)
        np.testing.assert_array_equal(adv, advs[name])
        results[name].append((total, loop))
        print(f"{name:6s} run {rep}: {total:.3f} s, {loop:.3f} s outside the model, "
              f"{images} images queried")
med = {k: (statistics.median(t for t, _ in v), statistics.median(o for _, o in v))
       for k, v in results.items()}
for k, (t, o) in med.items():
    print(f"median {k:6s}: {t:.3f} s total, {o:.3f} s outside the model")
print(f"after / before: {med['after'][0] / med['before'][0]:.3f} total, "
      f"{med['after'][1] / med['before'][1]:.3f} outside the model (medians); "
      f"{min(results['after'])[0] / min(results['before'])[0]:.3f} total (fastest runs)")
