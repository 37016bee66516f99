"""PyTorch references for AutoAttack's speed, run on our exported ONNX model.

Runs in a side virtual environment, never in this project's (torch stays out of
requirements.txt, CI and the tests):

    python3 -m venv /tmp/torchref
    /tmp/torchref/bin/pip install torch torchattacks onnx2torch onnx numpy
    /tmp/torchref/bin/python benchmarks/torch_autoattack.py --onnx=exports/quickstart/model.onnx --n_examples=200
    /tmp/torchref/bin/python benchmarks/torch_autoattack.py --onnx=exports/quickstart/model.onnx \
        --n_examples=200 --official=AUTO_ATTACK_DIR

Two implementations: torchattacks' AutoAttack(version="standard") (the default), or,
with --official=DIR (a checkout of github.com/fra31/auto-attack, the authors' code),
their AutoAttack(version="standard").run_standard_evaluation. It converts model.onnx
to a torch module with onnx2torch, feeds it NCHW images (Square and FAB read the channel
count from dimension 1; the exported graph takes NHWC, so a transpose sits in front of
it), and runs AutoAttack on the first --n_examples embedded test digits
(keras_arat/data/digits_5k.npz) at --eps, in one call with all --n_examples images,
seed 0. The stages are timed one by one inside the implementation's own loop (each
attacks the points the earlier ones left), and it prints the same per-stage table as
benchmarks/eval_throughput.py.

torchattacks builds APGD, APGD-T and FAB with its default steps=10, where the standard
version of fra31/auto-attack (and keras_arat's) runs 100; Square has 5,000 queries in
all three. `benchmarks/eval_throughput.py --n_iter=10` runs ours on torchattacks' budget.
"""

import argparse
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "keras_arat", "data", "digits_5k.npz")


class TimedStage:
    """Wraps one attack callable: records its seconds and the images it was given."""

    def __init__(self, attack, name):
        self.attack = attack
        self.name = name
        self.seconds = 0.0
        self.attacked = 0

    def __call__(self, images, labels, *args, **kwargs):
        start = time.perf_counter()
        adv = self.attack(images, labels, *args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.attacked += len(images)
        return adv

    def __getattr__(self, item):  # MultiAttack reads e.g. .device from its attacks
        return getattr(self.attack, item)


NAMES = ["apgd-ce", "apgd-t", "fab-t", "square"]


def digits_nchw(n):
    """The first n embedded test digits as keras_arat loads them (a 2-pixel zero border,
    gray in 3 channels, [0,1]), channels first: (float32 [n, 3, 32, 32], int64 [n])."""
    data = np.load(DIGITS)
    x = np.pad(data["x_test"][:n], ((0, 0), (2, 2), (2, 2))).astype(np.float32) / 255.0
    return np.repeat(x[:, None], 3, axis=1), data["y_test"][:n].astype(np.int64)


def torchattacks_run(model, images, labels, eps, seed):
    """torchattacks' AutoAttack standard in one call: (run, stages, label)."""
    import torchattacks
    attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard",
                                     n_classes=10, seed=seed)
    stages = [TimedStage(a, name) for a, name in zip(attack._autoattack.attacks, NAMES)]
    attack._autoattack.attacks = stages
    return (lambda: attack(images, labels)), stages, f"torchattacks {torchattacks.__version__}"


def official_run(model, images, labels, eps, seed, directory):
    """fra31/auto-attack's standard version, run_standard_evaluation in one batch."""
    sys.path.insert(0, os.path.abspath(directory))
    from autoattack import AutoAttack
    adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed,
                           verbose=False, device="cpu")
    stages = []
    for part, name in zip((adversary.apgd, adversary.apgd_targeted, adversary.fab,
                           adversary.square), NAMES):
        stage = TimedStage(part.perturb, name)  # the standard version uses fab as FAB-T
        part.perturb = stage
        stages.append(stage)
    return ((lambda: adversary.run_standard_evaluation(images, labels, bs=len(images))),
            stages, f"fra31/auto-attack ({directory})")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--onnx", required=True, help="model.onnx written by export")
    parser.add_argument("--n_examples", type=int, default=200)
    parser.add_argument("--eps", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--official", default=None, metavar="DIR",
                        help="a checkout of fra31/auto-attack: run it instead of torchattacks")
    parser.add_argument("--robust_out", default=None, metavar="FILE.npy",
                        help="write the per-example verdicts (bool [n]: still correct)")
    args = parser.parse_args()

    from importlib.metadata import version
    try:
        import onnx
        import onnx2torch
        import torch
    except ImportError as exc:
        sys.exit(f"error: {exc.name} is missing: this script runs in a side environment with "
                 "torch, torchattacks and onnx2torch (see its docstring), never in the "
                 "project's")

    torch.set_num_threads(args.threads)
    graph = onnx2torch.convert(onnx.load(args.onnx)).eval()

    class NCHW(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.permute(0, 2, 3, 1))

    model = NCHW(graph).eval()
    n = args.n_examples
    x, y = digits_nchw(n)
    images, labels = torch.from_numpy(x), torch.from_numpy(y)
    if args.official:
        run, stages, label = official_run(model, images, labels, args.eps, args.seed,
                                          args.official)
    else:
        run, stages, label = torchattacks_run(model, images, labels, args.eps, args.seed)
    print(f"{label} AutoAttack standard on {args.onnx} (onnx2torch {version('onnx2torch')}); "
          f"eps {args.eps:.4f} L-inf; {n} test images in one call; torch {torch.__version__}, "
          f"{args.threads} threads, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()})", flush=True)
    with torch.no_grad():
        clean = (model(images).argmax(1) == labels).float().mean().item()
    start = time.perf_counter()
    adv = run()
    total = time.perf_counter() - start
    with torch.no_grad():
        still = (model(adv).argmax(1) == labels).numpy()
    robust = float(still.mean())
    if args.robust_out:
        np.save(args.robust_out, still)
    print(f"clean acc {clean:.3f}; AutoAttack standard acc {robust:.3f} in {total:.1f} s: "
          f"{n / total:.2f} img/s")
    print(f"{'stage':<8} {'attacked':>8} {'time s':>8} {'img/s':>8}")
    for stage in stages:
        if stage.attacked:
            print(f"{stage.name:<8} {stage.attacked:>8d} {stage.seconds:>8.1f} "
                  f"{stage.attacked / stage.seconds:>8.2f}")


if __name__ == "__main__":
    main()
