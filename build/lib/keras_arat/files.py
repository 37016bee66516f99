"""Writing the run's small files: one atomic JSON writer for every JSON file a run keeps."""

import json
import os


def write_json(path, data, **dump_kwargs):
    """Write `data` as JSON to `path` atomically: a reader sees the old file or the new one,
    never a half-written one (written to PATH.tmp, flushed to disk, then renamed)."""
    dump_kwargs.setdefault("indent", 1)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, **dump_kwargs)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path, default=None):
    """The JSON in `path`, or `default` when the file does not exist."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default
