"""Every figure is what its label says: each attack alone, AutoAttack alone at eps, the
worst case named as such, and the official code's leaky PGD-20 kept out of figures at eps.

Two hand-built models make the differences certain (10 classes, 8x8x1 images at 0.5,
label 0), with eps 0.1:
- one_pixel: class 0 while pixel (3, 3) is above 0.5. The images hold it at 0.65, 1.5 eps
  above: nothing within eps changes the class, but the official code's PGD, whose ball is
  centred on x + U(-eps, eps), reaches 0.5 whenever its noise there is below -0.05 (a
  quarter of the points).
- cw_blind: z_0 = 0, z_1 = -0.5 (constant), z_2 = -3 + 60 (x_p - 0.5). Within eps, z_2
  passes z_0 (breaking the point) only by raising x_p, and the CW margin (best other
  logit minus the true one) has no gradient there while z_1 is the best other logit, that
  is unless the random start put x_p above 0.5 + 2.5/60; cross-entropy's gradient always
  raises x_p. So PGD-20 breaks every point and CW only some.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from keras_arat.attacks import AutoAttack
from keras_arat.evaluation import (WORST_CASE, evaluate_model, evaluate_model_fn,
                                 write_outputs)
from tests import cli

EPS = 0.1
N = 64
PIXEL = (3, 3)


def images(center, n=N):
    x = np.full((n, 8, 8, 1), 0.5, np.float32)
    x[:, PIXEL[0], PIXEL[1], 0] = center
    return x, np.zeros(n, np.int64)


def one_pixel(z):
    t = 10.0 * (z[:, PIXEL[0], PIXEL[1], 0] - 0.5)
    rest = tf.fill([tf.shape(z)[0], 8], -50.0)
    return tf.concat([t[:, None], -t[:, None], rest], axis=1)


def cw_blind(z, center=0.5):
    n = tf.shape(z)[0]
    z2 = -3.0 + 60.0 * (z[:, PIXEL[0], PIXEL[1], 0] - center)
    return tf.concat([tf.zeros([n, 1]), tf.fill([n, 1], -0.5), z2[:, None],
                      tf.fill([n, 7], -5.0)], axis=1)


def small_autoattack():
    return AutoAttack(eps=EPS, n_iter=10, n_queries=200, n_target_classes=3)


def test_autoattack_alone_at_eps_and_the_leaky_pgd_labelled_beside_it(tmp_path):
    x, y = images(0.5 + 1.5 * EPS)
    accs, details = evaluate_model_fn(one_pixel, x, y, EPS,
                                      ("clean", "pgd20", "pgd20-leak", "autoattack"),
                                      batch_size=N, autoattack=small_autoattack())
    assert accs["clean"] == 1.0 and accs["pgd20"] == 1.0
    # AutoAttack at eps cannot change a class 1.5 eps away; the leaky PGD breaks the points
    # whose noise fell below -eps/2 (about a quarter).
    assert accs["autoattack"] == 1.0
    assert 0.5 < accs["pgd20-leak"] < 0.95, accs
    assert accs["autoattack"] > accs["pgd20-leak"]
    stages = details["autoattack"]["stages"]
    assert [s["attack"] for s in stages] == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    # The worst case is over the attacks at eps only: the 2-eps figure stays out.
    assert details["worst_case_over"] == ["clean", "pgd20", "autoattack"]
    assert accs[WORST_CASE] == 1.0

    printed = write_outputs(str(tmp_path), {"source": "one_pixel", "eps": EPS, "norm": "linf",
                                            "n_examples": N, "model_file": "one_pixel"},
                            {"deployed": accs}, {"deployed": details}, 1, 0, 0,
                            ("OnePixel", "deployed", "test", "robustbench.json"))
    (entry,) = printed["evaluated"]
    record = json.load(open(os.path.join(tmp_path, entry["record"])))
    by_attack = {r["attack"]: r for r in record["results"]}
    leak = by_attack["pgd20-leak"]
    assert leak["settings"]["ball_radius"] == pytest.approx(2 * EPS)
    assert leak["settings"]["reference_noise_leak"] is True
    assert by_attack["pgd20"]["settings"]["reference_noise_leak"] is False
    assert by_attack["autoattack"]["worst_case_over"] == ["clean", "autoattack"]
    assert by_attack[WORST_CASE]["worst_case_over"] == ["clean", "pgd20", "autoattack"]
    assert by_attack[WORST_CASE]["settings"]["over"] == ["clean", "pgd20", "autoattack"]
    rb = json.load(open(os.path.join(tmp_path, "robustbench.json")))
    assert rb["autoattack_acc"] == "100.00"
    assert "worst case over" not in rb["footnote"] and "none of the four stages" in \
        rb["footnote"]


def test_each_attack_is_alone_and_the_worst_case_is_named():
    x, y = images(0.5)
    out = evaluate_model(cw_blind, x, y, EPS, ("clean", "pgd20", "cw"), batch_size=N)
    accs = out["accuracy"]
    assert accs["clean"] == 1.0
    assert accs["pgd20"] == 0.0  # cross-entropy always finds the way up
    # CW breaks only the points whose start already made z_2 the best other logit.
    assert 0.4 < accs["cw"] < 0.95, accs
    # The cw figure is CW alone (not the worst case over pgd20 and cw, which is 0).
    assert accs[WORST_CASE] == 0.0 and out["worst_case_over"] == ["clean", "pgd20", "cw"]
    assert list(accs) == ["clean", "pgd20", "cw", WORST_CASE]
    # One attack at eps: no worst case to report.
    alone = evaluate_model(cw_blind, x, y, EPS, ("clean", "cw"), batch_size=N)
    assert WORST_CASE not in alone["accuracy"] and "worst_case_over" not in alone


class Serve(tf.Module):
    """cw_blind as a SavedModel (serving_default: images -> logits) for the command line;
    uint8 images of 128 are 128/255, so the model's threshold moves there."""

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32, name="images")])
    def serve(self, images):
        return {"logits": cw_blind(images, center=128 / 255)}


@pytest.mark.slow  # 15 s: the command line on a SavedModel
def test_cli_records_each_attack_alone_and_the_worst_case(tmp_path):
    module = Serve()
    model = str(tmp_path / "cw_blind")
    tf.saved_model.save(module, model, signatures={"serving_default": module.serve})
    x = np.full((N, 8, 8, 1), 128, np.uint8)
    data = str(tmp_path / "data.npz")
    np.savez(data, x_test=x, y_test=np.zeros(N, np.int64))
    proc = cli.run_cli("keras_arat.evaluate", f"--saved_model={model}", f"--dataset=npz:{data}",
                       f"--eps={EPS}", "--attacks=clean,pgd20,cw", f"--batch_size={N}",
                       f"--output_dir={tmp_path / 'out'}", "--noprogress", "--query_onnx=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (entry,) = json.loads(proc.stdout)["evaluated"]
    accs = entry["accuracy"]
    assert accs["pgd20"] == 0.0 and 0.4 < accs["cw"] < 0.95 and accs[WORST_CASE] == 0.0
    record = json.load(open(os.path.join(tmp_path, "out", entry["record"])))
    over = {r["attack"]: r["worst_case_over"] for r in record["results"]}
    assert over == {"clean": ["clean"], "pgd20": ["clean", "pgd20"], "cw": ["clean", "cw"],
                    WORST_CASE: ["clean", "pgd20", "cw"]}
