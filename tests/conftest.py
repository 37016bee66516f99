import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")


# tests/test_distribute.py (two logical devices, two worker processes) is slow as a whole;
# it is marked here, beside the other files' @pytest.mark.slow, while it is being changed.
SLOW_FILES = ("test_distribute.py",)


def pytest_collection_modifyitems(config, items):
    import pytest
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
