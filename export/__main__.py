"""`python -m export`: see export/cli.py (flags: --helpfull)."""

from . import cli

__doc__ = cli.__doc__ + "\nAll flags: python -m export --helpfull\n"  # shown by --help

if __name__ == "__main__":
    cli.main()
