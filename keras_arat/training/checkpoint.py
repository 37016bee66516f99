"""One checkpoint writer: atomic epoch checkpoints with checksums.

Layout: checkpoints/epoch-0003/{ckpt.index, ckpt.data-*, manifest.json}. A
checkpoint is written into a temporary folder and renamed into place only after
every file and the manifest (sha256 of each file) are on disk, so the latest
`epoch-*` folder is always complete; a folder whose files no longer match their
checksums is reported and skipped in favour of the previous one.
"""

import errno
import hashlib
import json
import os
import re
import shutil

import tensorflow as tf
from absl import logging

from keras_arat import files as file_io
from keras_arat.errors import UsageError

# Kinds of checkpoint folder: epoch-N (resumed from), best-N (--keep_best), swa-N (SWA).
KINDS = ("epoch", "best", "swa")
MANIFEST = "manifest.json"


class CheckpointError(UsageError):
    """A checkpoint folder that is damaged, incomplete or of another run."""


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folders(directory, prefix="epoch"):
    """(epoch, path) of every `prefix-N` folder in `directory`, newest first."""
    if prefix not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {prefix!r}")
    if not os.path.isdir(directory):
        return []
    pattern = re.compile(rf"^{prefix}-(\d+)$")
    found = []
    for name in os.listdir(directory):
        m = pattern.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found, reverse=True)


def read_metadata(path):
    """The manifest of checkpoint folder `path` (epoch, files and what the writer added)."""
    with open(os.path.join(path, MANIFEST)) as f:
        return json.load(f)


def verify(path):
    """Problem with checkpoint folder `path` as a one-line string, or None if intact."""
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e.__class__.__name__})"
    for name, digest in manifest.get("files", {}).items():
        file_path = os.path.join(path, name)
        if not os.path.exists(file_path):
            return f"missing file {name}"
        if _sha256(file_path) != digest:
            return f"checksum mismatch in {name}"
    return None


class CheckpointManager:
    """Writes and finds the training state (model, optimizer, a_prev, epoch)."""

    def __init__(self, directory, keep=3, **objects):
        self.directory = directory
        self.keep = keep
        self.checkpoint = tf.train.Checkpoint(**objects)

    def folders(self, prefix="epoch"):
        """(epoch, path) of every `prefix-N` checkpoint folder, newest first."""
        return folders(self.directory, prefix)

    def latest(self, prefix="epoch"):
        """(epoch, path) of the newest intact `prefix-N` checkpoint, or None."""
        for epoch, path in self.folders(prefix):
            problem = verify(path)
            if problem is None:
                return epoch, path
            logging.warning("checkpoint %s is damaged (%s); trying the previous one", path,
                            problem)
        return None

    def save(self, epoch, metadata=None, prefix="epoch"):
        """Write checkpoint `prefix-EPOCH` atomically; only `epoch-*` ones are resumed.

        Only the newest `keep` epoch-* folders are kept, and of swa-* the one just written.
        best-* folders are pruned to the newest when an epoch checkpoint at or after it is
        written.
        """
        os.makedirs(self.directory, exist_ok=True)
        final = os.path.join(self.directory, f"{prefix}-{epoch:04d}")
        tmp = os.path.join(self.directory, f".tmp-{prefix}-{epoch:04d}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            try:
                self.checkpoint.write(os.path.join(tmp, "ckpt"))
            except tf.errors.OpError as e:  # TensorFlow's own file layer: make it an OSError
                full = "No space left" in e.message or "File too large" in e.message
                raise OSError(errno.ENOSPC if full else errno.EIO,
                              "No space left on device" if full else e.message.splitlines()[0],
                              final) from None
            files = {name: _sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
            for name in files:
                with open(os.path.join(tmp, name), "rb") as f:
                    os.fsync(f.fileno())
            file_io.write_json(os.path.join(tmp, MANIFEST),
                               {"epoch": epoch, "files": files, **(metadata or {})})
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: no partial folder left
            raise
        _fsync_dir(self.directory)
        if prefix == "epoch":
            # Older best-N folders go once an epoch checkpoint has passed the newest: a run
            # killed before this point resumes with the best it had at its checkpoint.
            best = self.folders("best")
            stale = self.folders()[self.keep:] + (best[1:] if best and best[0][0] <= epoch
                                                  else [])
        elif prefix == "swa":
            stale = [(e, p) for e, p in self.folders(prefix) if p != final]
        else:
            stale = []
        for _, old in stale:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def discard_after(self, epoch, prefix):
        """Remove `prefix-N` folders with N > epoch (written by a run that was then
        killed before its epoch-N checkpoint: the resumed run recomputes them)."""
        for e, path in self.folders(prefix):
            if e > epoch:
                shutil.rmtree(path, ignore_errors=True)

    def restore(self, path):
        """Load the checkpoint in folder `path`; every saved value must be used."""
        status = self.checkpoint.read(os.path.join(path, "ckpt"))
        try:
            status.assert_existing_objects_matched()
        except AssertionError as e:
            raise CheckpointError(f"checkpoint {path} does not match this model: "
                                  f"{str(e).splitlines()[0]}") from None
        return status
