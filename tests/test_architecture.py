"""ARCHITECTURE.md's layers hold: every import in keras_arat/ and export/ (module level or
inside a function) goes to the importer's own layer or an earlier one, and every module
belongs to exactly one layer. The table is read from ARCHITECTURE.md, so the document and
the check cannot drift apart."""

import ast
import fnmatch
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("keras_arat", "export")


def read_layers(path=os.path.join(ROOT, "ARCHITECTURE.md")):
    """[(layer, [path patterns])] in the table's order."""
    layers = []
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`"):
            layers.append((cells[0], re.findall(r"`([^`]+)`", cells[1])))
    return layers


def layer_of(rel, layers):
    """Index of the layer whose most specific pattern matches `rel` (a path from the
    root), or None."""
    best = None
    for index, (_, patterns) in enumerate(layers):
        for pattern in patterns:
            hit = rel.startswith(pattern) if pattern.endswith("/") else \
                fnmatch.fnmatch(rel, pattern)
            if hit and (best is None or len(pattern) > best[1]):
                best = (index, len(pattern))
    return None if best is None else best[0]


def module_path(dotted, root):
    """keras_arat.x.y or keras_arat.export.z -> the file's path from root, or None."""
    parts = dotted.split(".")
    if parts[0] != "keras_arat":
        return None
    if len(parts) > 1 and parts[1] == "export":
        parts = ["export"] + parts[2:]
    base = os.path.join(root, *parts)
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.exists(candidate):
            return os.path.relpath(candidate, root)
    return None


def imported_files(tree, root):
    """(line, path) of every keras_arat module an AST imports. `from keras_arat import n`
    counts the submodule n, or the package's public names when n is not a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = module_path(alias.name, root)
                if target:
                    yield node.lineno, target
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                target = module_path(f"{node.module}.{alias.name}", root) or \
                    module_path(node.module, root)
                if target:
                    yield node.lineno, target


def violations(root, layers):
    """Lines 'importer (layer) -> imported (layer)' for imports going to a later layer,
    and 'unplaced: path' for modules no layer names."""
    found = []
    for package in PACKAGES:
        for folder, _, names in os.walk(os.path.join(root, package)):
            for name in sorted(n for n in names if n.endswith(".py")):
                rel = os.path.relpath(os.path.join(folder, name), root)
                mine = layer_of(rel, layers)
                if mine is None:
                    found.append(f"unplaced: {rel}")
                    continue
                tree = ast.parse(open(os.path.join(root, rel)).read(), rel)
                for line, target in imported_files(tree, root):
                    theirs = layer_of(target, layers)
                    if theirs is not None and theirs > mine:
                        found.append(f"{rel}:{line} ({layers[mine][0]}) -> {target} "
                                     f"({layers[theirs][0]})")
    return found


def test_every_import_goes_to_its_own_or_an_earlier_layer():
    layers = read_layers()
    assert [name for name, _ in layers] == [
        "foundation", "data", "network", "attacks", "training", "evaluation", "runs",
        "export", "commands"]
    assert violations(ROOT, layers) == []


def test_the_check_fails_on_an_import_going_the_wrong_way(tmp_path):
    """A data module importing the training command line, and a module in no layer, are
    both reported."""
    (tmp_path / "keras_arat" / "data").mkdir(parents=True)
    (tmp_path / "export").mkdir()
    (tmp_path / "keras_arat" / "__init__.py").write_text("")
    (tmp_path / "keras_arat" / "train.py").write_text("import os\n")
    (tmp_path / "keras_arat" / "errors.py").write_text("")
    (tmp_path / "keras_arat" / "stray.py").write_text("")
    (tmp_path / "keras_arat" / "data" / "__init__.py").write_text(
        "from keras_arat import errors\n\ndef f():\n    from keras_arat import train\n")
    found = sorted(violations(str(tmp_path), read_layers()))
    assert found == ["keras_arat/data/__init__.py:4 (data) -> keras_arat/train.py (commands)",
                     "unplaced: keras_arat/stray.py"]
