"""Export parity and serving latency: folded ONNX (onnxruntime) vs the split-BN Keras model.

    python benchmarks/export_latency.py --workdir=runs/quickstart_export
        [--keras_model=FILE.keras] [--branch=adv] [--n_examples=1000] [--out=DIR]

Exports the run (or the .keras network, test data and eps from the run) with
`python -m export`'s code into --out (default: a temporary folder), then prints
  * the max abs logit difference of each format vs the split-BN model,
  * accuracy and PGD-20 accuracy before / after folding,
  * median latency (ms) and throughput (images/s) at batch 1 and 128 of the folded ONNX
    model in onnxruntime (CPU) vs the split-BN Keras model in inference mode
    (tf.function, training=False) and the folded Keras model.
Exits 1 if the export fails its checks.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def timed(fn, x, repeats, warmup=3):
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return median * 1e3, len(x) / median


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--keras_model", default=None)
    parser.add_argument("--branch", default="adv")
    parser.add_argument("--n_examples", type=int, default=1000)
    parser.add_argument("--out", default=None, help="keep the export here")
    parser.add_argument("--repeats_b1", type=int, default=200)
    parser.add_argument("--repeats_b128", type=int, default=30)
    args = parser.parse_args()
    from keras_arat import quiet
    quiet.import_tensorflow()  # without its start-up log (KERAS_ARAT_VERBOSE=1 shows it)

    import numpy as np
    import onnxruntime as ort
    import tensorflow as tf
    from absl import logging

    from keras_arat.export import exporter, sources
    logging.set_verbosity(logging.WARNING)

    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.mkdtemp(prefix="export_latency-")
        out = os.path.join(tmp, "out")
    try:
        start = time.time()
        try:
            report = exporter.export_run(
                workdir=args.workdir, keras_model=args.keras_model, branch=args.branch,
                out=out, overwrite=args.out is not None, n_examples=args.n_examples,
                log=lambda *_: None)
        except (exporter.UsageError, exporter.ExportCheckError) as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            sys.exit(1)
        export_s = time.time() - start

        print(f"export of {report['network']['class']} ({report['branch']} branch) "
              f"on {report['n_examples']} test images: {export_s:.1f} s, "
              f"tolerance {report['tolerance_abs_logits']:g}, passed={report['passed']}")
        print("max abs logit difference vs the split-BN model (inference mode):")
        for key, value in report["max_abs_logit_diff_vs_original"].items():
            print(f"  {key:<14} {value:.3e}")
        print(f"  (largest |logit| {report['max_abs_logit']:.3g})")
        acc, pgd = report["accuracy"], report["pgd20_accuracy"]
        print(f"{'':24}{'split-BN':>10}{'folded':>10}")
        print(f"{'clean accuracy':24}{acc['original']:>10.4f}{acc['folded_keras']:>10.4f}"
              f"   (SavedModel {acc.get('saved_model', float('nan')):.4f}, "
              f"onnxruntime {acc.get('onnxruntime', float('nan')):.4f})")
        print(f"{'PGD-20 accuracy':24}{pgd['original']:>10.4f}{pgd['folded_keras']:>10.4f}"
              f"   (eps {pgd['eps']:.4g}, step eps/4, seed {pgd['seed']}, "
              f"{pgd['n_examples']} images)")

        network, x, _, _, _ = sources.load_source(exporter.ExportRequest(
            workdir=args.workdir, keras_model=args.keras_model, n_examples=128))
        branch = args.branch
        keras_fn = tf.function(lambda z: network(z, training=False, branch=branch))
        folded = __import__("keras").saving.load_model(os.path.join(out, "model.keras"))
        folded_fn = tf.function(lambda z: folded(z, training=False))
        session = ort.InferenceSession(os.path.join(out, "model.onnx"),
                                       providers=["CPUExecutionProvider"])

        def onnx_fn(z):
            return session.run(["logits"], {"images": z})[0]

        rows = [("onnxruntime, folded ONNX", onnx_fn),
                ("Keras split-BN (tf.function)", lambda z: keras_fn(z).numpy()),
                ("Keras folded (tf.function)", lambda z: folded_fn(z).numpy())]
        x128 = np.ascontiguousarray(np.resize(x, (128,) + x.shape[1:]).astype(np.float32))
        print(f"latency on this machine ({os.cpu_count()} CPUs), median of "
              f"{args.repeats_b1} (batch 1) / {args.repeats_b128} (batch 128) runs:")
        print(f"  {'model':<30}{'b1 ms':>9}{'b1 img/s':>11}{'b128 ms':>10}{'b128 img/s':>12}")
        for label, fn in rows:
            ms1, ips1 = timed(fn, x128[:1], args.repeats_b1)
            ms128, ips128 = timed(fn, x128, args.repeats_b128)
            print(f"  {label:<30}{ms1:>9.3f}{ips1:>11.0f}{ms128:>10.2f}{ips128:>12.0f}")
        if args.out:
            print(f"export kept in {out}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
