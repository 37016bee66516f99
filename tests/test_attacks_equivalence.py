"""The fast AutoAttack stages give the verdicts of the plain compositions they replaced.

APGD-T and FAB-T used to run one Python-unrolled run per target class over the whole
batch; FAB's final bisection ran on every point, found or not; Square used to query every
point of the batch until the last one broke; FAB's hyperplane projection sorted the
breakpoints. The references below are those plain
compositions, built from the same per-run parts, on a fixed model, batch and seed.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_arat.attacks import APGD, FABTargeted, Square, core
from keras_arat.attacks.apgd import apgd_single_run
from keras_arat.attacks.fab import fab_targeted_run, final_search, project_on_hyperplane
from keras_arat.attacks.square import _rand_position, _signs, _window
from tests import helpers

N = 48
SEED = tf.constant([5, 1], tf.int64)


@pytest.fixture(scope="module")
def setup():
    net = helpers.tiny_network(split_bn=False, trained=True)
    x, y = helpers.tiny_data().test
    return (lambda z: net(z, training=False, branch="adv")), x[:N], y[:N].astype(np.int64)


def wrong(f, x_adv, y):
    return ~core.is_correct(f(tf.constant(x_adv)), y).numpy()


def sorted_projection(t, w, b, norm):
    """The textbook solution in float64: sort the breakpoints, find the piece, solve it."""
    t, w, b = (np.asarray(a, np.float64) for a in (t, w, b))
    c = np.sum(w * t, 1) - b
    flip = np.where(c >= 0, 1.0, -1.0)
    w, c = w * flip[:, None], c * flip
    active = np.abs(w) > 1e-12
    slack = np.where(w < 0, 1.0 - t, t)
    if norm == "linf":
        omega, r, gain = np.abs(w), slack, np.ones_like(w)
    else:
        omega, r, gain = w ** 2, slack / np.where(active, np.abs(w), 1.0), np.abs(w)
    omega, r = np.where(active, omega, 0.0), np.where(active, r, 0.0)
    lam = np.zeros(len(t))
    for i in range(len(t)):
        order = np.argsort(r[i])
        rs, os_ = r[i][order], omega[i][order]
        below = np.concatenate([[0.0], np.cumsum(os_ * rs)])  # sum over r_j < r_k
        rest = os_.sum() - np.concatenate([[0.0], np.cumsum(os_)])  # sum over r_j >= r_k
        values = below[:-1] + rs * rest[:-1]  # F at each breakpoint
        k = np.searchsorted(values, c[i])  # first breakpoint with F >= c
        lam[i] = rs[-1] + 1.0 if k == len(rs) else (c[i] - below[k]) / rest[k]
    return np.where(active, -np.sign(w) * gain * np.minimum(lam[:, None], r), 0.0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_newton_projection_matches_the_sorted_solution(setup, norm):
    f, x, y = setup
    # Realistic inputs: digits (many pixels exactly 0 or 1, so tied breakpoints) and the
    # gradients FAB linearises with, at the digits and at noisy copies of them.
    rng = np.random.default_rng(0)
    noisy = np.clip(x + rng.uniform(-0.2, 0.2, x.shape), 0, 1).astype(np.float32)
    points = tf.constant(np.concatenate([x, noisy]))
    with tf.GradientTape() as tape:
        tape.watch(points)
        margin = tf.reduce_sum(core.cw_margin(f(points), np.concatenate([y, y])))
    w = tape.gradient(margin, points).numpy().reshape(2 * N, -1)
    t = points.numpy().reshape(2 * N, -1)
    # Targets on both sides, some beyond what the box allows (the infeasible branch).
    b = np.sum(w * t, 1) + rng.normal(0, 1, 2 * N) * np.abs(w).sum(1) * 0.05
    b[:4] = np.sum(w * t, 1)[:4] + 10.0 * np.abs(w).sum(1)[:4]
    got = project_on_hyperplane(tf.constant(t), tf.constant(w), tf.constant(b, tf.float32),
                                norm).numpy()
    want = sorted_projection(t, w, b, norm)
    np.testing.assert_allclose(got, want, atol=2e-5)  # float32 against float64


def test_apgd_t_same_verdicts_as_one_run_per_target(setup):
    f, x, y = setup
    eps, n_iter, n_targets = 0.08, 5, 3
    attack = APGD(eps=eps, loss="dlr-targeted", n_iter=n_iter, n_target_classes=n_targets)
    got = wrong(f, attack(f, x, y, SEED).numpy(), y)
    # The composition it replaced: every target's run over the whole batch.
    logits = f(x)
    correct = core.is_correct(logits, y)
    targets = tf.math.top_k(logits, k=n_targets + 1).indices
    best, best_loss, adv = x, tf.fill([N], -np.inf), x
    first_broken_by = np.full(N, -1)
    for t in range(n_targets):
        target = tf.cast(targets[:, t + 1], tf.int64)
        x_best, loss_best, x_best_adv, still = apgd_single_run(
            f, x, y, lambda z, tg=target: core.targeted_dlr(z, y, tg), eps, "linf", n_iter,
            0.75, core.fold_seed(SEED, t, 0))
        newly = correct & ~still
        first_broken_by[newly.numpy()] = t
        adv = tf.where(core.bcast(newly, x), x_best_adv, adv)
        better = correct & (loss_best > best_loss)
        best = tf.where(core.bcast(better, x), x_best, best)
        best_loss = tf.where(better, loss_best, best_loss)
        correct &= still
    want = wrong(f, tf.where(core.bcast(correct, x), best, adv).numpy(), y)
    assert (first_broken_by > 0).any(), "no point broken after the first target: weak test"
    assert 0 < want.sum() < N
    np.testing.assert_array_equal(got, want)


def test_fab_t_same_verdicts_as_one_run_per_target(setup):
    f, x, y = setup
    eps, n_iter, n_targets = 0.09, 5, 3
    attack = FABTargeted(eps=eps, n_iter=n_iter, n_target_classes=n_targets)
    got = wrong(f, attack(f, x, y, SEED).numpy(), y)
    x = tf.constant(x)
    logits = f(x)
    correct = core.is_correct(logits, y)
    targets = tf.cast(tf.math.top_k(logits, k=n_targets + 1).indices, tf.int64)
    adv, first_broken_by = x, np.full(N, -1)
    for t in range(n_targets):
        x_run, ok = fab_targeted_run(f, x, y, targets[:, t + 1], eps, "linf", n_iter, 0.1,
                                     1.05, 0.9)
        newly = correct & ok
        first_broken_by[newly.numpy()] = t
        adv = tf.where(core.bcast(newly, x), x_run, adv)
        correct &= ~ok
    want = wrong(f, adv.numpy(), y)
    assert (first_broken_by > 0).any(), "no point broken after the first target: weak test"
    assert 0 < want.sum() < N
    np.testing.assert_array_equal(got, want)


def test_fab_final_search_same_as_bisecting_the_whole_batch(setup):
    f, x, y = setup
    steps = 10
    x = tf.constant(x)
    # Candidates as FAB's loop leaves them: adversarial points at several distances, and
    # points it found nothing for (adv = x).
    noise = tf.random.stateless_uniform(x.shape, seed=[3, 4], minval=-1.0, maxval=1.0)
    adv = tf.clip_by_value(x + tf.sign(noise) * tf.linspace(0.05, 0.8, N)[:, None, None, None],
                           0.0, 1.0)
    found = tf.logical_not(core.is_correct(f(adv), y))
    adv = tf.where(core.bcast(found, x), adv, x)
    # The composition it replaced: the bisection over the whole batch, kept where found.
    delta, lo, hi = adv - x, tf.zeros([N]), tf.ones([N])
    for _ in range(steps):
        mid = (lo + hi) / 2.0
        bad = tf.logical_not(core.is_correct(f(x + core.bcast(mid, x) * delta), y))
        lo, hi = tf.where(bad, lo, mid), tf.where(bad, mid, hi)
    searched = tf.where(core.bcast(found, x), x + core.bcast(hi, x) * delta, x)
    dist = core.lp_norm(searched - x, "linf").numpy()
    # eps between the found points' distances: some kept, some dropped.
    eps = float(np.median(dist[found.numpy()]))
    want_ok = found & (dist <= eps) & ~core.is_correct(f(searched), y)
    want_adv = tf.where(core.bcast(want_ok, x), searched, x)
    got_adv, got_ok = final_search(f, x, y, adv, found, eps, "linf", steps)
    kept, n_found = int(tf.reduce_sum(tf.cast(want_ok, tf.int32))), int(np.sum(found))
    assert 0 < kept < n_found < N, f"need kept, dropped and unfound points: {kept}, {n_found}"
    np.testing.assert_array_equal(got_ok.numpy(), want_ok.numpy())
    np.testing.assert_allclose(got_adv.numpy(), want_adv.numpy(), atol=1e-6)  # float32


def test_fab_final_search_queries_only_the_points_found(setup):
    """Nothing found: the model is not called at all (an empty batch broke oneDNN's
    convolution on one CPU: it returned its input's shape); else only on those found."""
    f, x, y = setup
    x, batches = tf.constant(x[:4]), []

    def counted(z):
        batches.append(int(z.shape[0]))
        return f(z)

    adv = tf.clip_by_value(x + 0.5, 0.0, 1.0)
    got_adv, got_ok = final_search(counted, x, y[:4], adv, tf.zeros([4], tf.bool), 0.3, "linf")
    assert batches == [] and not got_ok.numpy().any()
    np.testing.assert_array_equal(got_adv.numpy(), x.numpy())
    final_search(counted, x, y[:4], adv, tf.constant([False, True, False, True]), 0.3, "linf")
    assert batches == [2] * 11  # 10 bisection steps and the last check, on the 2 found


def plain_square(attack, f, x, y, seed):
    """The loop Square replaced: every point is queried with every proposal, broken ones
    only stop being updated. Returns (x_best, broken, broken_at, images queried)."""
    eps, n_queries = attack.eps, attack.n_queries
    n, (h, w, c) = len(x), x.shape[1:]
    x_best = tf.clip_by_value(x + eps * _signs(core.fold_seed(seed, -1), [n, 1, w, c]), 0, 1)
    margin_min = loss_min = core.true_margin(f(x_best), y)
    broken_at, queried = np.full(n, -1), 0
    for it in range(n_queries):
        active = margin_min > 0
        if not tf.reduce_any(active):
            break
        seeds = tf.random.experimental.stateless_split(core.fold_seed(seed, it), 3)
        s = attack._side(it, h, w, c, 1)
        # The reference's draw: one window and one sign per channel for the whole batch.
        window = _window(h, w, _rand_position(seeds[0], h - s),
                         _rand_position(seeds[1], w - s), s)
        x_new = core.project(x_best + 2 * eps * window * _signs(seeds[2], [1, 1, 1, c]), x,
                             eps)
        margin = core.true_margin(f(x_new), y)
        queried += int(tf.reduce_sum(tf.cast(active, tf.int32)))
        improved = active & (margin < loss_min)
        loss_min = tf.where(improved, margin, loss_min)
        take = active & (improved | (margin <= 0))
        margin_min = tf.where(take, margin, margin_min)
        x_best = tf.where(core.bcast(take, x), x_new, x_best)
        broken_at[(take & (margin <= 0)).numpy()] = it
    return x_best.numpy(), (margin_min <= 0).numpy(), broken_at, queried


def counting(f):
    """f, and a counter of the images it was given (inside tf.function too)."""
    count = tf.Variable(0, dtype=tf.int64)

    def counted(z):
        count.assign_add(tf.cast(tf.shape(z)[0], tf.int64))
        return f(z)
    return counted, count


@pytest.mark.slow  # 20 s: Square's queries on the whole batch and on survivors
def test_square_same_verdicts_as_querying_the_whole_batch(setup):
    f, x, y = setup
    attack = Square(eps=0.15, n_queries=150)
    got_x, got_broken = attack._single_run(f, tf.constant(x), tf.constant(y), SEED)
    want_x, want_broken, broken_at, _ = plain_square(attack, f, x, y, SEED)
    # Points broke at different queries, so the working set shrank while others went on.
    assert len(set(broken_at[broken_at >= 0])) > 1 and (~want_broken).any()
    np.testing.assert_array_equal(got_broken.numpy(), want_broken)
    np.testing.assert_allclose(got_x.numpy(), want_x, atol=1e-6)


def test_square_skips_only_proposals_that_change_nothing():
    """Late in the schedule a 1-pixel window often repeats the best point's own value:
    that proposal is not queried, and nothing else changes. A fixed linear model on
    8x8 gray images (labels = its own predictions) makes such proposals frequent."""
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (40, 8, 8, 1)).astype(np.float32)
    x[:, :2] = 0.0  # a dark border, as in the digits: clipping makes more repeats
    weights = tf.constant(rng.normal(0, 1, (64, 10)).astype(np.float32))

    def f(z):
        return tf.matmul(tf.reshape(z, [-1, 64]), weights)
    y = np.argmax(f(x).numpy(), 1).astype(np.int64)
    attack = Square(eps=0.05, n_queries=700)
    counted, count = counting(f)
    run = tf.function(lambda a, b, sd: attack._single_run(counted, a, b, sd))
    got_x, got_broken = run(tf.constant(x), tf.constant(y), SEED)
    want_x, want_broken, broken_at, queried = plain_square(attack, f, tf.constant(x), y, SEED)
    assert 0 < want_broken.sum() < len(x), "every or no point broken: weak test"
    np.testing.assert_array_equal(got_broken.numpy(), want_broken)
    np.testing.assert_allclose(got_x.numpy(), want_x, atol=1e-6)
    # The initial point is scored for all 40; then the skipped proposals are what is saved.
    skipped = queried + len(x) - int(count.numpy())
    print(f"skipped {skipped} of {queried} proposals")
    assert skipped > 0.1 * queried, (skipped, queried)


@pytest.mark.slow  # 10 s: a tf2onnx conversion and two Square runs
def test_square_on_onnxruntime_same_verdicts_as_on_tensorflow(setup):
    """Square may query another runtime of the same model (AutoAttack.run's query_fn):
    the tiny network converted to ONNX and run by onnxruntime gives the broken set and the
    points that querying the network itself gives (its logits differ by ~1e-7)."""
    from keras_arat.attacks import AutoAttack
    from keras_arat.deployed import onnx_runner_for
    f, x, y = setup
    query_fn = onnx_runner_for(f, x.shape[1:]).as_tf()
    attack = Square(eps=0.15, n_queries=150)
    want_x, want_broken = tf.function(attack._single_run)(f, tf.constant(x), tf.constant(y),
                                                           SEED)
    got_x, got_broken = tf.function(attack._single_run)(query_fn, tf.constant(x),
                                                         tf.constant(y), SEED)
    assert 0 < want_broken.numpy().sum() < N, "every or no point broken: weak test"
    np.testing.assert_array_equal(got_broken.numpy(), want_broken.numpy())
    np.testing.assert_allclose(got_x.numpy(), want_x.numpy(), atol=1e-6)
    # Through AutoAttack: the same verdicts, which are the network's own.
    aa = AutoAttack(eps=0.15, attacks=[attack])
    want = aa.run(f, x, y, batch_size=N, seed=3)
    got = aa.run(f, x, y, batch_size=N, seed=3, query_fn=query_fn)
    np.testing.assert_array_equal(got.robust, want.robust)
    assert got.robust.sum() < got.clean_correct.sum()


def host_runtime(f):
    """f as a host runtime (numpy in, numpy logits out) that counts the images it is given."""
    def host(images):
        host.images += len(images)
        return f(tf.constant(images)).numpy()
    host.images = 0
    return host


def test_square_host_loop_same_points_as_the_traced_loop(setup):
    """Square's L-inf loop on the host (for onnxruntime) is the traced loop in numpy: on
    the same model, batch and seed it returns the same points, bit for bit, and so the
    same verdicts; both restarts run, points break at different queries, and points the
    model misclassifies at the start are returned as they are."""
    f, x, y = setup
    y = y.copy()
    y[:3] = (np.argmax(f(tf.constant(x[:3])).numpy(), 1) + 1) % 10  # wrong at the start
    attack = Square(eps=0.15, n_queries=150, n_restarts=2)
    want = tf.function(attack.__call__, autograph=False)(f, tf.constant(x), tf.constant(y),
                                                         SEED).numpy()
    host = host_runtime(f)
    got = attack.host_call(host, x, y, SEED)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)  # tolerance 0: the same float32 operations
    broken = wrong(f, got, y)
    assert 3 < broken.sum() < N, f"every or no point broken: weak test ({broken.sum()})"
    np.testing.assert_array_equal(got[:3], x[:3])
    # Each restart queried the points left: far fewer images than 2 x 150 x N.
    assert N < host.images < 2 * 150 * N, host.images


def test_square_runs_on_the_host_only_when_its_query_model_is_a_host_runtime(setup):
    """run_attack (and so AutoAttack) takes the host loop when query_fn carries `host`
    (OnnxRunner.as_tf() does) and the attack is L-inf; the verdicts are the same."""
    from keras_arat.attacks.autoattack import run_attack
    f, x, y = setup
    attack = Square(eps=0.15, n_queries=40)
    host = host_runtime(f)

    def query_fn(z):
        return f(z)
    query_fn.host = host
    want_x, want = run_attack(attack, f, x, y, batch_size=N, seed=3, query_fn=f)
    got_x, got = run_attack(attack, f, x, y, batch_size=N, seed=3, query_fn=query_fn)
    assert host.images > 40, "the host runtime was not queried"
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_x, want_x)
    # L2 keeps the traced loop: its host runtime is not called.
    l2, host.images = Square(eps=1.0, norm="l2", n_queries=5), 0
    assert not l2.runs_on_host
    run_attack(l2, f, x, y, batch_size=N, seed=3, query_fn=query_fn)
    assert host.images == 0
    with pytest.raises(ValueError, match="Square runs on the host for L-inf only, not l2"):
        l2.host_call(host, x, y, SEED)


def test_a_query_model_that_is_not_the_model_is_refused(setup):
    from keras_arat.attacks import AutoAttack, EvaluationError, check_agreement
    f, x, y = setup
    assert check_agreement(f, f, x) == 0.0
    off = lambda z: f(z) * 1.01  # noqa: E731 - a logit 1% off is another model
    with pytest.raises(EvaluationError, match="does not compute the model's logits: they "
                                               "differ by up to"):
        AutoAttack(eps=0.15, attacks=[Square(eps=0.15, n_queries=2)]).run(
            f, x, y, query_fn=off)


def test_square_schedule_rescaled_only_when_asked():
    """AutoAttack's Square keeps the schedule's query counts (10, 50, 200, ...) at 5,000
    queries; rescale_schedule=True (torchattacks' AutoAttack) reads them as if the budget
    were 10,000, so the windows shrink twice as early. Sides on 32x32x3, p_init 0.8."""
    def sides(attack, its):
        return [int(attack._side(tf.constant(it), 32, 32, 3, 1)) for it in its]
    its = [0, 6, 10, 26, 101, 2001, 4999]
    # s = round(sqrt(p * 1024)): p = 0.8 / 2^k
    assert sides(Square(eps=0.1), its) == [29, 29, 29, 20, 14, 4, 3]
    assert sides(Square(eps=0.1, rescale_schedule=True), its) == [29, 20, 20, 14, 10, 3, 1]


def test_square_linf_samples_as_the_reference():
    """The authors' L-inf Square draws, at each query, one window position for the whole
    batch with top and left in [0, h - s) (random_int(0, h - s): floor(U * (h - s))) and
    one sign per channel for the whole batch (random_choice([c, 1, 1])). Checked on the
    draws both of Square's loops use: 32x32x3 at query 0 (s = 29, so positions 0, 1, 2,
    never 3), and a window as large as the image (s = h: position 0)."""
    attack = Square(eps=0.1)
    tops, lefts, signs = set(), set(), []
    for it in range(300):
        s, top, left, sign = attack._linf_draws(0, core.fold_seed(SEED, it), (32, 32, 3))
        assert int(s) == 29
        tops.add(int(top))
        lefts.add(int(left))
        assert sign.shape == (1, 1, 1, 3)  # one sign per channel, shared by the batch
        signs.append(sign.numpy().reshape(3))
    assert tops == {0, 1, 2} and lefts == {0, 1, 2}
    signs = np.array(signs)
    assert set(np.unique(signs)) == {-1.0, 1.0}
    # Each channel's sign is drawn on its own: all four sign patterns of two channels occur.
    assert len({tuple(row[:2]) for row in signs}) == 4
    whole = Square(eps=0.1, p_init=1.0)  # s = round(sqrt(64)) = 8 = h on 8x8 images
    for it in range(20):
        s, top, left, _ = whole._linf_draws(0, core.fold_seed(SEED, it), (8, 8, 1))
        assert (int(s), int(top), int(left)) == (8, 0, 0)


def test_square_proposals_of_a_query_share_window_and_signs():
    """In a real run, every point attacked at a query gets the same window and the same
    sign per channel: on identical images at 0.5 (no clipping), each proposal's window
    holds 0.5 + eps * sign(channel), the same for all points, and every pixel outside the
    window is what the point held before (its best point)."""
    eps, n = 0.1, 5
    x = np.full((n, 8, 8, 3), 0.5, np.float32)
    y = np.zeros(n, np.int64)
    seen = []

    def never_broken(z):  # margin 100 - 1e-3 * sum: any change may be taken, none breaks
        seen.append(z.numpy().copy())
        total = tf.reduce_sum(z, axis=[1, 2, 3])[:, None]
        return tf.concat([100.0 - 1e-3 * total, tf.zeros([tf.shape(z)[0], 9])], axis=1)
    Square(eps=eps, n_queries=30)._single_run(never_broken, tf.constant(x), tf.constant(y),
                                              SEED)
    best, checked = seen[0], 0  # the stripes start, scored once
    for proposal in seen[1:]:
        if len(proposal) != n:
            break  # some proposals changed nothing and were not queried: rows unknown
        moved = np.any(proposal != best, axis=(0, 3))  # [h, w]: changed for some point
        rows, cols = np.flatnonzero(moved.any(1)), np.flatnonzero(moved.any(0))
        window = (slice(None), slice(rows.min(), rows.max() + 1),
                  slice(cols.min(), cols.max() + 1))
        inside = proposal[window]  # [n, s, s, c]: one value per channel for all points
        np.testing.assert_allclose(inside, np.broadcast_to(inside[:1, :1, :1], inside.shape),
                                   atol=1e-6)
        np.testing.assert_allclose(np.abs(inside - 0.5), eps, atol=1e-6)
        # Taken where the margin fell (the pixel sum rose): the next best points.
        taken = proposal.sum(axis=(1, 2, 3)) > best.sum(axis=(1, 2, 3))
        best = np.where(taken[:, None, None, None], proposal, best)
        checked += 1
    assert checked >= 10, checked
