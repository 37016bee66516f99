"""Export of keras_arat networks: fold a BN branch, write SavedModel / ONNX / .keras,
check parity, and serve (client.py, standin.py). Run `python -m export --help`."""
