"""Callbacks of the training loop: a_prev, metrics/TensorBoard logging, checkpoints."""

import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf


def branch_accuracy(predict, x, y, batch_size=256):
    """Accuracy of `predict` (images -> logits) on in-memory arrays, in batches."""
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = predict(tf.convert_to_tensor(x[i:i + batch_size]))
        correct += int(np.sum(np.argmax(logits.numpy(), -1) == y[i:i + batch_size]))
    return correct / max(len(x), 1)


class APrevCallback(keras.callbacks.Callback):
    """Sets ARAT's a_prev at each epoch start: clean-branch accuracy, inference mode, on
    the images sample(epoch) -> (x, y) gives (a new subset each epoch, as the official
    code), or on fixed arrays x, y."""

    def __init__(self, x=None, y=None, batch_size=256, sample=None):
        super().__init__()
        if (sample is None) == (x is None or y is None):
            raise ValueError("APrevCallback takes either images x and labels y or "
                             "sample(epoch) -> (x, y)")
        self.sample = sample or (lambda epoch: (x, y))
        self.batch_size = batch_size
        self.predict = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.predict is None:  # traced once, not once per epoch
            network = self.model.network
            self.predict = tf.function(lambda z: network(z, training=False, branch="clean"))
        x, y = self.sample(epoch)
        self.model.a_prev.assign(branch_accuracy(self.predict, x, np.asarray(y),
                                                 self.batch_size))


class NonFiniteLossError(RuntimeError):
    pass


class StopOnNonFinite(keras.callbacks.Callback):
    """Stops training at the first batch whose running loss is NaN or Inf."""

    def __init__(self, steps_per_epoch):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.error = None
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            step = self.epoch * self.steps_per_epoch + batch + 1
            self.error = (f"loss became {float(loss)} at step {step} (epoch {self.epoch + 1}, "
                          f"batch {batch + 1}): the learning rate is likely too high for this "
                          "model or the data holds bad values; the last good checkpoint is "
                          "kept (--nan_policy=skip_batch skips such batches instead)")
            self.model.stop_training = True


class MetricsLogger(keras.callbacks.Callback):
    """Appends one JSON line per epoch to metrics.jsonl and mirrors it to TensorBoard.

    every_steps=N also writes TensorBoard scalars train_steps/<figure> at every N-th
    optimiser step: each the mean over the steps since the previous such point of the
    same epoch (at most N), from the running epoch means Keras passes to each batch.
    """

    def __init__(self, workdir, lr_schedule, extra=None, every_steps=0, steps_per_epoch=None):
        super().__init__()
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
        self.lr_schedule = lr_schedule
        self.extra = extra or {}
        self.start = None
        self.every_steps, self.steps_per_epoch = int(every_steps or 0), steps_per_epoch
        self.epoch, self.mark = 0, (0, {})

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.time()
        self.epoch, self.mark = epoch, (0, {})

    def on_train_batch_end(self, batch, logs=None):
        if not self.every_steps or not self.steps_per_epoch:
            return
        step = self.epoch * self.steps_per_epoch + batch + 1
        if step % self.every_steps:
            return
        n = batch + 1
        done, before = self.mark
        now = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in (logs or {}).items()}
        self.mark = (n, now)
        with self.writer.as_default():
            for key, value in now.items():
                if key == "skipped_batches":  # a running sum, not a mean
                    window = value - before.get(key, 0.0)
                else:  # the mean of batches done+1..n from the means over 1..done and 1..n
                    window = (n * value - done * before.get(key, 0.0)) / (n - done)
                tf.summary.scalar(f"train_steps/{key}", window, step=step)
        self.writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        record = {"epoch": epoch + 1, "step": int(self.model.optimizer.iterations.numpy()),
                  "lr": self.lr_schedule.value_at_epoch(epoch)}
        record.update({k: float(v) for k, v in (logs or {}).items()})
        record["epoch_time_s"] = round(time.time() - self.start, 3)
        append_metrics(self.path, record, self.writer)


def append_metrics(path, record, writer=None):
    """One line of metrics.jsonl, flushed to disk, and its numbers as TensorBoard scalars."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if writer is not None:
        step = int(record.get("epoch", 0))
        prefix = record.get("split", "train")
        with writer.as_default():
            for key, value in record.items():
                if key not in ("epoch", "split") and isinstance(value, (int, float)):
                    tf.summary.scalar(f"{prefix}/{key}", value, step=step)
        writer.flush()


class ProgressLines(keras.callbacks.Callback):
    """For logs: between Keras' end-of-epoch lines (fit's verbose=2), a line with the
    epoch's steps done, elapsed time and ETA every KERAS_ARAT_PROGRESS_SECONDS."""

    def __init__(self, steps_per_epoch, epochs):
        super().__init__()
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.bar = None

    def on_epoch_begin(self, epoch, logs=None):
        from keras_arat.progress import Progress
        self.bar = Progress(self.steps_per_epoch, f"epoch {epoch + 1}/{self.epochs}", "steps")

    def on_train_batch_end(self, batch, logs=None):
        self.bar.update(1)

    def on_epoch_end(self, epoch, logs=None):
        self.bar.close(line=False)  # Keras prints the epoch's line


class PeriodicEvaluation(keras.callbacks.Callback):
    """Evaluates every `every` epochs (and after the last), logs the figures as a
    metrics.jsonl line {"split": "test", ...} and TensorBoard test/ scalars, and with
    keep_best writes checkpoints/best-N when the figure beats every earlier one.

    evaluate: () -> {"clean_acc", "pgd20_acc", "n_examples", ...}. The best so far is
    read back from the newest best-N checkpoint, so a resumed run continues the contest
    (train.py first removes best-N folders from after the checkpoint it resumes from).
    """

    def __init__(self, evaluate, every, epochs, workdir, manager, keep_best="none",
                 label=None):
        super().__init__()
        self.evaluate, self.every, self.epochs = evaluate, int(every), int(epochs)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
        self.manager, self.keep_best = manager, keep_best
        self.key = {"pgd20": "pgd20_acc", "clean": "clean_acc"}.get(keep_best)
        self.label = dict(label or {})

    def best_record(self):
        """{"epoch", "checkpoint", figures...} of the kept best checkpoint, or None."""
        if self.key is None:
            return None
        from keras_arat.training.checkpoint import read_metadata
        found = self.manager.latest("best")
        if found is None:
            return None
        epoch, path = found
        meta = read_metadata(path)
        return {"epoch": epoch, "checkpoint": f"checkpoints/{os.path.basename(path)}",
                "selected_by": self.key, **meta.get("figures", {})}

    def on_epoch_end(self, epoch, logs=None):
        epoch += 1
        if self.model.stop_training or (epoch % self.every and epoch != self.epochs):
            return
        figures = {**self.evaluate(), **self.label}
        record = {"split": "test", "epoch": epoch, **figures}
        if self.key is not None:
            best = self.best_record()
            if best is None or figures[self.key] > best[self.key]:
                kept = {k: v for k, v in figures.items() if k != "eval_time_s"}
                self.manager.save(epoch, {"figures": kept}, prefix="best")
                record["new_best"] = 1
        append_metrics(self.path, record, self.writer)


class CheckpointCallback(keras.callbacks.Callback):
    def __init__(self, manager, metadata=None):
        super().__init__()
        self.manager = manager
        self.metadata = metadata or {}

    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training:
            return  # a stopped epoch (non-finite loss) is not a good state to keep
        self.manager.save(epoch + 1, self.metadata)
