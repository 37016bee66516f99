"""Square Attack (Andriushchenko et al., ECCV 2020): query-based, forward passes only.

Written from the paper and the reference algorithm (fra31/auto-attack). Random search
on the margin loss z_y - max_{i != y} z_i, accepting a proposal when it lowers the loss
(or misclassifies). The side of the square is s = round(sqrt(p * H * W)), with p
halved by the schedule p_init, /2 after 10 queries, /4 after 50, /8 after 200,
/16 after 500, /32 after 1000, /64 after 2000, /128 after 4000, /256 after 6000,
/512 after 8000 (AutoAttack: p_init 0.8, 5,000 queries, schedule not rescaled).

L-inf: start from vertical stripes (x + eps * random sign per example, column and
channel), each proposal sets a random s x s window to +-2 eps per channel on top of the
best point, then projects. L2: start from a grid of "eta" windows (centred nested squares
weighted 1/(k+1)^2, two halves of opposite signs), each proposal moves the mass of two
windows into one new eta window, keeping the total norm eps.

Sampling, as the reference draws it: at each query one window position (top and left
uniform in [0, h - s), i.e. floor(U * (h - s))) for the whole batch; for L-inf also one
sign per channel for the whole batch, for L2 a sign per example and channel. No
gradients, so it also attacks models without any (ONNX).
"""

import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from keras_arat.attacks import core
from keras_arat.attacks.base import Attack, as_seed

P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init, it):
    """The fraction of pixels in the square at query `it` (int tensor or int)."""
    halvings = tf.reduce_sum(tf.cast(tf.cast(it, tf.int32) > tf.constant(P_SCHEDULE),
                                     tf.float32))
    return p_init / tf.pow(2.0, halvings)



def _eta_rectangle(rows, cols):
    delta = np.zeros([rows, cols], np.float64)
    rc, cc = rows // 2 + 1, cols // 2 + 1
    r0, c0 = rc - 1, cc - 1
    for k in range(max(rc, cc)):
        delta[max(r0, 0):min(r0 + 2 * k + 1, rows), max(c0, 0):min(c0 + 2 * k + 1, cols)] += \
            1.0 / (k + 1) ** 2
        r0 -= 1
        c0 -= 1
    return delta / np.sqrt((delta ** 2).sum())


def eta_window(s):
    """The L2 proposal of side s: nested squares, top half +, bottom half -, unit norm."""
    delta = np.zeros([s, s], np.float64)
    delta[:s // 2] = _eta_rectangle(s // 2, s) if s // 2 > 0 else 0.0
    delta[s // 2:] = -_eta_rectangle(s - s // 2, s)
    return delta / np.sqrt((delta ** 2).sum())


def _eta_table(h, w):
    """[max_side + 1, 2, h, w]: eta(s) at the top-left corner, and its transpose."""
    m = min(h, w)
    table = np.zeros([m + 1, 2, h, w], np.float32)
    for s in range(1, m + 1):
        e = eta_window(s)
        table[s, 0, :s, :s] = e
        table[s, 1, :s, :s] = e.T
    return tf.constant(table)


def _window(h, w, top, left, s):
    rows = tf.range(h)[:, None]
    cols = tf.range(w)[None, :]
    inside = (rows >= top) & (rows < top + s) & (cols >= left) & (cols < left + s)
    return tf.cast(inside, tf.float32)[None, :, :, None]  # [1, h, w, 1]


def _splice(images, block, top, left):
    """images [n, h, w, c] with block [n, s, s, c] written at (top, left)."""
    s = tf.shape(block)[1]
    band = images[:, top:top + s]
    band = tf.concat([band[:, :, :left], block, band[:, :, left + s:]], axis=2)
    out = tf.concat([images[:, :top], band, images[:, top + s:]], axis=1)
    out.set_shape(images.shape)
    return out


def _rand_position(seed, high):
    """A window's top (or left) corner: floor(U * high) with U uniform in [0, 1), so in
    [0, high) and 0 when high is 0, as the reference's random_int(0, high)."""
    u = tf.random.stateless_uniform([], seed=seed)
    return tf.cast(tf.floor(u * tf.cast(high, tf.float32)), tf.int32)


def _signs(seed, shape):
    return tf.where(tf.random.stateless_uniform(shape, seed=seed) < 0.5, -1.0, 1.0)


def _sum_sq(t):
    """Per example and channel: the sum of squares over the image, [n, 1, 1, c]."""
    return tf.reduce_sum(tf.square(t), axis=[1, 2], keepdims=True)


# The bookkeeping both query loops share (the traced _single_run and the host _host_run),
# written once over the few array operations it needs: _TF gives them in TensorFlow, _NP
# in numpy (plain indexing, and writes in place, so the host loop copies nothing more).
class _ArrayOps(NamedTuple):
    """An array library's operations, as _record_margins and _drop_broken use them."""

    gather: Callable  # (a, positions) -> a[positions]
    mask: Callable  # (a, flags) -> a[flags]
    index: Callable  # (positions, flags) -> positions[flags], in the form `put` takes
    put: Callable  # (a, index, values) -> a with a[index] = values


def _tf_index(positions, flags):
    return tf.boolean_mask(positions, flags)[:, None]


def _np_put(a, index, values):
    a[index] = values
    return a


_TF = _ArrayOps(tf.gather, tf.boolean_mask, _tf_index, tf.tensor_scatter_nd_update)
_NP = _ArrayOps(operator.getitem, operator.getitem, operator.getitem, _np_put)


def _record_margins(ops, at, margin, margin_min, loss_min):
    """The acceptance rule, on the working set: the proposals of positions at [k] scored
    margin [k]. A proposal improves when its margin is below its point's lowest margin yet
    (loss_min), and is taken when it improves or misclassifies (margin <= 0):

        improved = margin < loss_min[at];  take = improved | (margin <= 0)
        loss_min[at[improved]] = margin[improved];  margin_min[at[take]] = margin[take]

    Returns (take, taken = at[take] as ops.put takes it, margin_min, loss_min); numpy's
    margin_min and loss_min are updated in place."""
    improved = margin < ops.gather(loss_min, at)
    take = improved | (margin <= 0.0)
    loss_min = ops.put(loss_min, ops.index(at, improved), ops.mask(margin, improved))
    taken = ops.index(at, take)
    margin_min = ops.put(margin_min, taken, ops.mask(margin, take))
    return take, taken, margin_min, loss_min


def _drop_broken(ops, done, work, out_best, out_margin):
    """The working set work = (rows into the batch, images, labels, best points,
    margin_min, loss_min) without the points `done` marks (broken: margin_min <= 0), whose
    best points and margins go to out_best and out_margin at their rows right away.
    Returns (work, out_best, out_margin); numpy's out_best and out_margin are updated in
    place."""
    rows, _, _, best, margin_min, _ = work
    at = ops.index(rows, done)
    out_best = ops.put(out_best, at, ops.mask(best, done))
    out_margin = ops.put(out_margin, at, ops.mask(margin_min, done))
    keep = ~done
    return tuple(ops.mask(t, keep) for t in work), out_best, out_margin


@dataclasses.dataclass(frozen=True, kw_only=True)
class Square(Attack):
    """Square Attack on the margin loss; attack(model_fn, x, y, seed) -> x_adv, or
    Square(model, eps=...)(x, y) (base.py).

    Examples already misclassified at x are returned unchanged; the others get the best
    point found (misclassified if the attack succeeded, else the lowest-margin point). Each
    query runs the model on the points not yet misclassified only; the loop stops when none
    is left.
    """

    model: object = dataclasses.field(default=None, kw_only=False, compare=False, repr=False)
    eps: float
    norm: str = "linf"
    n_queries: int = 5000
    p_init: float = 0.8
    n_restarts: int = 1
    # True: the schedule's query counts are scaled to n_queries as if it were 10,000 (the
    # Square paper's default, and torchattacks' in its AutoAttack); AutoAttack's standard
    # version does not rescale it.
    rescale_schedule: bool = False
    name: str = "square"

    def __post_init__(self):
        if self.norm not in core.NORMS:
            raise ValueError(f"norm must be one of {core.NORMS}, got {self.norm!r}")
        if self.n_queries < 1 or self.n_restarts < 1:
            raise ValueError("n_queries and n_restarts must be >= 1")

    def _side(self, it, h, w, c, minimum):
        if self.rescale_schedule:
            it = tf.cast(it, tf.int64) * 10000 // self.n_queries
        p = p_selection(self.p_init, it)
        s = tf.cast(tf.round(tf.sqrt(p * float(h * w * c) / float(c))), tf.int32)
        s = tf.maximum(s, minimum)
        if minimum > 1:  # L2: odd sides
            s = tf.where(tf.math.floormod(s, 2) == 0, s + 1, s)
        return tf.minimum(s, min(h, w))

    def _linf_start(self, x, seed):
        """The L-inf run's first points: x + eps * a random sign per column and channel."""
        n, w, c = tf.shape(x)[0], x.shape[2], x.shape[3]
        eps = tf.cast(self.eps, x.dtype)
        return tf.clip_by_value(x + eps * _signs(core.fold_seed(seed, -1), [n, 1, w, c]),
                                0.0, 1.0)

    def _l2_start(self, x, seed, etas):
        """The L2 run's first points: x + a grid of eta windows of side h // 5, each with a
        random sign per example and channel, the whole perturbation of L2 norm eps."""
        n = tf.shape(x)[0]
        h, w, c = x.shape[1], x.shape[2], x.shape[3]
        init_seed = core.fold_seed(seed, -1)
        s0 = max(h // 5, 1)
        start = (h - s0 * 5) // 2
        delta = tf.zeros_like(x)
        for bi in range(h // s0):
            for bj in range(w // s0):
                top, left = start + bi * s0, start + bj * s0
                if top + s0 > h or left + s0 > w:
                    continue
                win = tf.roll(etas[s0, 0], [top, left], [0, 1])[None, :, :, None]
                sgn = _signs(core.fold_seed(init_seed, bi, bj), [n, 1, 1, c])
                delta += win * sgn
        eps = tf.cast(self.eps, x.dtype)
        return tf.clip_by_value(x + eps * core.normalize(delta, "l2"), 0.0, 1.0)

    def _linf_draws(self, it, qseed, image_shape):
        """Query `it`'s window (side, top, left) and its signs [1, 1, 1, c]: one draw for
        the whole batch, as the reference's."""
        h, w, c = image_shape
        s = self._side(it, h, w, c, 1)
        seeds = tf.random.experimental.stateless_split(qseed, 3)
        return s, _rand_position(seeds[0], h - s), _rand_position(seeds[1], w - s), \
            _signs(seeds[2], [1, 1, 1, c])

    def _linf_proposal(self, it, best, xs, rows, qseed):
        """Query `it`'s L-inf proposals (see _search): a window set to +-2 eps per channel
        on top of the best points, projected. `rows` is unused: the draws are the batch's."""
        del rows
        eps = tf.cast(self.eps, xs.dtype)
        s, top, left, signs = self._linf_draws(it, qseed, xs.shape[1:])
        # The proposal changes the best point inside the window only: compare there,
        # then build the proposals of the points it changes.
        corner, size = tf.stack([0, top, left, 0]), tf.stack([-1, s, s, -1])
        best_window = tf.slice(best, corner, size)
        new_window = core.project(best_window + 2.0 * eps * signs,
                                  tf.slice(xs, corner, size), eps, "linf")
        changed = tf.reduce_any(tf.not_equal(new_window, best_window), axis=[1, 2, 3])
        at = tf.where(changed)[:, 0]
        new_window = tf.gather(new_window, at)
        # Outside the window the projection returns the best point as it is, so the
        # proposal is the best point with the new window written in (two copies of the
        # images instead of a sum and a projection over all of them), and taking it
        # writes that window into the best point (no copy at all when none is taken).
        every = tf.equal(tf.size(at), tf.shape(best)[0])
        base = tf.cond(every, lambda: best, lambda: tf.gather(best, at))

        def accept(best, take, taken):
            def write():
                window = tf.tensor_scatter_nd_update(best_window, taken,
                                                     tf.boolean_mask(new_window, take))
                return _splice(best, window, top, left)
            return tf.cond(tf.reduce_any(take), write, lambda: best)
        return at, _splice(base, new_window, top, left), accept

    def _l2_proposal(self, it, best, xs, rows, qseed, *, n, etas):
        """Query `it`'s L2 proposals (see _search): the mass of two windows moved into a new
        eta window, the total norm kept at eps. The per-example signs are drawn for the
        whole batch (n) and then subset (rows), so a point gets the same proposals whichever
        other points are still being attacked."""
        h, w, c = xs.shape[1], xs.shape[2], xs.shape[3]
        eps = tf.cast(self.eps, xs.dtype)
        s = self._side(it, h, w, c, 3)
        seeds = tf.random.experimental.stateless_split(qseed, 6)
        top, left = _rand_position(seeds[0], h - s), _rand_position(seeds[1], w - s)
        top2, left2 = _rand_position(seeds[2], h - s), _rand_position(seeds[3], w - s)
        mask1 = _window(h, w, top, left, s)
        mask2 = _window(h, w, top2, left2, s)
        transpose = tf.cast(tf.random.stateless_uniform([], seed=seeds[4]) > 0.5, tf.int32)
        eta = tf.roll(tf.gather(tf.gather(etas, s), transpose), [top, left], [0, 1])
        eta = eta[None, :, :, None]
        delta = best - xs
        norm_w1 = tf.sqrt(_sum_sq(delta * mask1))  # [n, 1, 1, c]
        norm_image = core.bcast(core.lp_norm(delta, "l2"), xs)
        norm_windows = tf.sqrt(_sum_sq(delta * tf.maximum(mask1, mask2)))
        signs = tf.gather(_signs(seeds[5], [n, 1, 1, c]), rows)
        new = eta * signs + delta * mask1 / (1e-12 + norm_w1)
        scale = tf.sqrt(tf.maximum(eps ** 2 - norm_image ** 2, 0.0) / c + norm_windows ** 2)
        new = new / (1e-12 + tf.sqrt(_sum_sq(new))) * scale
        delta = delta * (1.0 - mask2)
        delta = delta * (1.0 - mask1) + new * mask1
        x_new = tf.clip_by_value(xs + eps * core.normalize(delta, "l2"), 0.0, 1.0)
        at = tf.range(tf.size(rows, out_type=tf.int64))  # the mass always moves

        def accept(best, take, taken):
            return tf.tensor_scatter_nd_update(best, taken, tf.boolean_mask(x_new, take))
        return at, x_new, accept

    def _search(self, model_fn, propose, seed, work, out_best, out_margin):
        """The query loop on the working set work (see _drop_broken), until n_queries or
        until no point is left; returns (work, out_best, out_margin).

        propose(it, best, xs, rows, qseed) -> (at, x_new, accept): the working-set
        positions whose proposal differs from their best point, those proposals, and
        accept(best, take, taken) -> the best points with the proposals of at[take]
        (= taken) taken. An unchanged proposal would score its best point's margin again,
        which is never an improvement (a point still in the working set has margin_min ==
        loss_min > 0), so it is not queried. The margins are then recorded by
        _record_margins and the broken points dropped by _drop_broken, as in _host_run."""
        def cond(it, work, out_best, out_margin):
            return tf.logical_and(it < self.n_queries, tf.size(work[0]) > 0)

        def body(it, work, out_best, out_margin):
            rows, xs, ys, best, margin_min, loss_min = work
            at, x_new, accept = propose(it, best, xs, rows, core.fold_seed(seed, it))
            margin = core.true_margin(model_fn(x_new), tf.gather(ys, at))
            take, taken, margin_min, loss_min = _record_margins(_TF, at, margin, margin_min,
                                                                loss_min)
            work = (rows, xs, ys, accept(best, take, taken), margin_min, loss_min)
            done = margin_min <= 0.0
            work, out_best, out_margin = tf.cond(
                tf.reduce_any(done), lambda: _drop_broken(_TF, done, work, out_best, out_margin),
                lambda: (work, out_best, out_margin))
            return it + 1, work, out_best, out_margin

        invariants = tuple(tf.TensorShape([None]).concatenate(t.shape[1:]) for t in work)
        _, work, out_best, out_margin = tf.while_loop(
            cond, body, (tf.constant(0), work, out_best, out_margin),
            shape_invariants=(tf.TensorShape([]), invariants, out_best.shape, out_margin.shape))
        return work, out_best, out_margin

    def _single_run(self, model_fn, x, y, seed):
        """One run: (the best points, whether each is misclassified). Only the points not
        yet misclassified are queried: the working set (rows into the batch, with their
        images, labels, best points, margins and losses) shrinks as points break."""
        n = tf.shape(x)[0]
        if self.norm == "linf":
            x_best, propose = self._linf_start(x, seed), self._linf_proposal
        else:
            etas = _eta_table(x.shape[1], x.shape[2])
            x_best = self._l2_start(x, seed, etas)
            propose = functools.partial(self._l2_proposal, n=n, etas=etas)
        margin_min = core.true_margin(model_fn(x_best), y)
        work = (tf.range(n, dtype=tf.int64), x, y, x_best, margin_min, margin_min)
        work, out_best, out_margin = _drop_broken(_TF, margin_min <= 0.0, work, x_best,
                                                  margin_min)
        work, out_best, out_margin = self._search(model_fn, propose, seed, work, out_best,
                                                  out_margin)
        rows, _, _, best, margin_min, _ = work
        out_best = tf.tensor_scatter_nd_update(out_best, rows[:, None], best)
        out_margin = tf.tensor_scatter_nd_update(out_margin, rows[:, None], margin_min)
        return out_best, out_margin <= 0.0

    def perturb(self, model_fn, x, y, seed):
        x = tf.convert_to_tensor(x)
        y = tf.cast(y, tf.int64)
        seed = as_seed(seed)
        correct = core.is_correct(model_fn(x), y)
        adv, best = x, x
        for r in range(self.n_restarts):
            x_run, fooled = self._single_run(model_fn, x, y, core.fold_seed(seed, r))
            fooled = tf.logical_and(fooled, tf.logical_not(core.is_correct(model_fn(x_run), y)))
            newly = tf.logical_and(correct, fooled)
            adv = tf.where(core.bcast(newly, x), x_run, adv)
            best = x_run
            correct = tf.logical_and(correct, tf.logical_not(fooled))
        # Still correct: the lowest-margin point of the last run (inside the ball too).
        return tf.stop_gradient(tf.where(core.bcast(correct, x), best, adv))

    # The L-inf attack again, with its query loop on the host, for a model that a host
    # runtime computes (onnxruntime: numpy images in, numpy logits out). Inside the traced
    # loop each query paid about 1.8 ms besides the model (the runtime's call through
    # tf.numpy_function, two full copies of the images to splice a window in, and some 30
    # small ops); numpy does the same bookkeeping in place (_record_margins and
    # _drop_broken on numpy arrays), copying the images once per query. The random draws
    # are the traced loop's own, made by TensorFlow a chunk of queries at a time, and every
    # step is the same float32 arithmetic, so both loops return the same points and
    # verdicts (tests/test_attacks_equivalence.py).
    # L2's proposals sum over windows, where numpy's and TensorFlow's summation orders
    # differ, so L2 keeps the traced loop.
    HOST_CHUNK = 250  # queries whose draws are made in one TensorFlow call

    @property
    def runs_on_host(self):
        """Whether host_call can run this attack (L-inf only; see above)."""
        return self.norm == "linf"

    def host_call(self, query, x, y, seed):
        """__call__ with the queries made from numpy: query(images [k,h,w,c] float32) ->
        logits [k, classes] (numpy). x, y, seed as for __call__ (arrays or tensors);
        returns x_adv as a numpy array."""
        if not self.runs_on_host:
            raise ValueError(f"Square runs on the host for L-inf only, not {self.norm}")
        x = np.asarray(x, np.float32)
        y = np.asarray(y).astype(np.int64)
        seed = tf.cast(seed, tf.int64)
        correct = _np_correct(query(x), y)
        adv, best = x, x
        for r in range(self.n_restarts):
            x_run, fooled = self._host_run(query, x, y, core.fold_seed(seed, r))
            fooled &= ~_np_correct(query(x_run), y)
            adv = np.where(_np_bcast(correct & fooled, x), x_run, adv)
            best = x_run
            correct &= ~fooled
        return np.where(_np_bcast(correct, x), best, adv)

    def _host_run(self, query, x, y, seed):
        """_single_run's L-inf run in numpy: the same draws (_draws_function), proposals
        and bookkeeping (_record_margins, _drop_broken), the images changed in place."""
        draws = _draws_function(self, x.shape[1:])
        eps = np.float32(self.eps)
        two_eps = np.float32(2.0) * eps
        zero, one = np.float32(0.0), np.float32(1.0)
        out_best = np.array(self._linf_start(tf.constant(x), seed))  # writable
        out_margin = _np_true_margin(query(out_best), y)
        # The working set: the points not yet misclassified, as in the traced loop.
        rows = np.flatnonzero(out_margin > 0)
        xs, ys, best = x[rows], y[rows], out_best[rows]
        margin_min, loss_min = out_margin[rows], out_margin[rows].copy()
        it = 0
        while it < self.n_queries and rows.size:
            if it % self.HOST_CHUNK == 0:
                count = min(self.HOST_CHUNK, self.n_queries - it)
                sides, tops, lefts, signs = (np.asarray(t) for t in draws(
                    tf.constant(it), tf.constant(count), seed))
            j = it % self.HOST_CHUNK
            it += 1
            s, top, left = int(sides[j]), int(tops[j]), int(lefts[j])
            window = (slice(None), slice(top, top + s), slice(left, left + s))
            best_window, x_window = best[window], xs[window]
            new_window = best_window + two_eps * signs[j]  # [c]: one per channel
            # core.project, L-inf: clip the perturbation to the ball, the point to [0, 1].
            new_window = np.clip(x_window + np.clip(new_window - x_window, -eps, eps),
                                 zero, one)
            at = np.flatnonzero((new_window != best_window).reshape(len(rows), -1).any(1))
            if not at.size:  # every proposal is its best point: nothing to query
                continue
            x_new = best[at]
            x_new[window] = new_window[at]
            margin = _np_true_margin(query(x_new), ys[at])
            _, taken, margin_min, loss_min = _record_margins(_NP, at, margin, margin_min,
                                                             loss_min)
            best[(taken,) + window[1:]] = new_window[taken]
            done = margin_min <= 0
            if done.any():
                work = (rows, xs, ys, best, margin_min, loss_min)
                work, out_best, out_margin = _drop_broken(_NP, done, work, out_best, out_margin)
                rows, xs, ys, best, margin_min, loss_min = work
        out_best[rows], out_margin[rows] = best, margin_min
        return out_best, out_margin <= 0


@functools.lru_cache(maxsize=16)
def _draws_function(attack, image_shape):
    """tf.function (start, count, seed) -> the windows' sides, tops and lefts [count] and
    the signs [count, c] of queries start..start+count-1 of an L-inf run: the draws of the
    traced loop (_linf_draws), made in one call."""
    c = image_shape[-1]

    def draws(start, count, seed):
        def body(i, sides, tops, lefts, signs):
            it = start + i
            s, top, left, sign = attack._linf_draws(it, core.fold_seed(seed, it), image_shape)
            return (i + 1, sides.write(i, s), tops.write(i, top), lefts.write(i, left),
                    signs.write(i, tf.reshape(sign, [c])))

        arrays = [tf.TensorArray(tf.int32, size=count) for _ in range(3)]
        arrays.append(tf.TensorArray(tf.float32, size=count))
        _, *arrays = tf.while_loop(lambda i, *_: i < count, body, (0, *arrays))
        return tuple(a.stack() for a in arrays)

    return tf.function(draws, autograph=False, input_signature=[
        tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32), tf.TensorSpec([2], tf.int64)])


def _np_true_margin(logits, labels):
    """core.true_margin in numpy, the same float32 operations."""
    logits = np.asarray(logits, np.float32)
    onehot = np.eye(logits.shape[1], dtype=np.float32)[labels]
    other = np.max(logits - np.float32(1e9) * onehot, axis=-1)
    return -(other - np.sum(onehot * logits, axis=-1))


def _np_correct(logits, labels):
    return np.argmax(np.asarray(logits), axis=-1) == labels


def _np_bcast(v, like):
    return v.reshape([-1] + [1] * (like.ndim - 1))
