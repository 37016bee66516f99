import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")


# tests/test_distribute.py (two logical devices, two worker processes) is slow as a whole;
# it is marked here, beside the other files' @pytest.mark.slow, while it is being changed.
SLOW_FILES = ("test_distribute.py",)

# The files that take longest (minutes each in CI's --durations), longest first. Under
# `-n 2 --dist loadfile` files are handed to the two processes in collection order, so
# these go first and the short files fill in beside them; otherwise one process could be
# left running a long file alone at the end. The order changes no test's outcome.
LONG_FILES = ("test_docs.py", "test_cli.py", "test_evaluate.py", "test_export.py",
              "test_experiments.py", "test_reliability.py", "test_distribute.py",
              "test_serving.py", "test_convert_torch.py", "test_user_models.py",
              "test_torch_equivalence.py", "test_eval_throughput.py")


def pytest_collection_modifyitems(config, items):
    import pytest
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable
