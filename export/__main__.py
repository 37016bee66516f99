"""`python -m export`: see export/cli.py (flags: --helpfull). The package is imported by
one name, keras_arat.export (keras_arat/__init__.py), also from here."""

from keras_arat.export import cli

__doc__ = cli.__doc__ + "\nAll flags: python -m export --helpfull\n"  # shown by --help

if __name__ == "__main__":
    cli.main()
