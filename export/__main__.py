"""`python -m export`: see export/cli.py (flags: --helpfull)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from . import cli  # noqa: E402

__doc__ = cli.__doc__ + "\nAll flags: python -m export --helpfull\n"  # shown by --help

if __name__ == "__main__":
    cli.main()
