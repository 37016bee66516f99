"""Progress a person can follow, on a terminal and in a piped log alike (no TensorFlow).

    bar = Progress(1000, "pgd20")      # counted job: done/total, elapsed, ETA
    bar.update(256); ...; bar.close()  # close() prints the final line
    log("export: writing the SavedModel")

On a terminal the line is rewritten in place (at most twice a second). Anywhere else
(a pipe, a log file, a CI job) every report is a full line, at most one every
KERAS_ARAT_PROGRESS_SECONDS seconds (default 10), and the last one always: a log holds
a few readable lines and no carriage returns. Everything goes to stderr, so stdout
keeps only a command's result.
"""

import os
import sys
import time

ENV_SECONDS = "KERAS_ARAT_PROGRESS_SECONDS"
DEFAULT_SECONDS = 10.0


def log(message, stream=None):
    """One line on stderr, flushed at once."""
    stream = stream or sys.stderr
    stream.write(f"{message}\n")
    stream.flush()


def interval_seconds():
    try:
        return max(0.0, float(os.environ.get(ENV_SECONDS, DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


def is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def duration(seconds):
    """12 s, 3 min 05 s, 1 h 02 min."""
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Progress of a job of `total` units (`unit`, e.g. images) with elapsed time and ETA."""

    def __init__(self, total, desc, unit="images", enabled=True, stream=None, interval=None,
                 clock=time.monotonic):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = is_terminal(self.stream)
        self.interval = (0.5 if self.tty else interval_seconds()) if interval is None \
            else interval
        self.clock = clock
        self.start = self.last = clock()
        self.done = 0
        self.closed = False

    def line(self, final=False):
        elapsed = self.clock() - self.start
        if final:
            return f"{self.desc}: {self.done}/{self.total} {self.unit} in {duration(elapsed)}"
        text = f"{self.desc}: {self.done}/{self.total} {self.unit}, {duration(elapsed)}"
        if 0 < self.done < self.total:
            text += f", ETA {duration(elapsed / self.done * (self.total - self.done))}"
        return text

    def _write(self, text, final=False):
        if self.tty:
            end = "\n" if final else ""
            self.stream.write(f"\r{text}\033[K{end}")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, n=1):
        self.done += int(n)
        if not self.enabled or self.closed:
            return
        now = self.clock()
        if self.done < self.total and now - self.last >= self.interval:
            self.last = now
            self._write(self.line())

    def close(self, line=True):
        """The final line (line=False: none, e.g. when the caller prints its own)."""
        if self.enabled and not self.closed and line:
            self._write(self.line(final=True), final=True)
        elif self.enabled and not self.closed and self.tty and self.done:
            self.stream.write("\r\033[K")  # clear the in-place line
            self.stream.flush()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
