"""The repository's shape: one-way dependencies in helpers/, library apart from tools."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = {"restructure_dataset", "extract_frames", "fashion_mnist_tiny_imagenet", "moving_fashion_mnist",
         "ucf101_features"}


def helpers_imports():
    """``{module: {helpers modules it imports anywhere, inside functions too}}`` for helpers/."""
    graph = {}
    for path in sorted((ROOT / "helpers").glob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "helpers":
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helpers."):
                imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported.update(a.name.split(".")[1] for a in node.names if a.name.startswith("helpers."))
        graph[path.stem] = imported - {path.stem}
    return graph


def test_no_import_cycles_in_helpers():
    graph = helpers_imports()
    assert graph["training"] >= {"distribute", "multiworker"}  # the parse sees what it should

    def visit(module, path):
        for dependency in graph.get(module, ()):
            assert dependency not in path, f"import cycle: {' -> '.join(path + [dependency])}"
            visit(dependency, path + [dependency])

    for module in graph:
        visit(module, [module])


def test_library_does_not_import_tools():
    graph = helpers_imports()
    library = set(graph) - TOOLS - {"__init__"}
    assert {"data", "training", "cli", "rundir"} <= library
    for module in sorted(library):
        assert not graph[module] & TOOLS, f"helpers/{module}.py imports the tool(s) {graph[module] & TOOLS}"


def test_image_extensions_are_what_keras_reads():
    tf = pytest.importorskip("tensorflow")
    from helpers.formats import IMAGE_EXTENSIONS

    keras_reads = tf.keras.preprocessing.image.DirectoryIterator.white_list_formats
    assert sorted(IMAGE_EXTENSIONS) == sorted(f".{extension}" for extension in keras_reads)
