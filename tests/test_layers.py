"""The layers point one way (README: Architecture), read from the source's own imports."""

from __future__ import annotations

from kilntest import ROOT, script


def import_graph():  # the script that measures the graph
    return script("import_graph")


def test_no_module_imports_a_layer_above_it() -> None:
    graph = import_graph()
    climbing = graph.upward(graph.read_graph())
    assert climbing == [], "\n".join(f"{e.source}:{e.line} imports {e.target}" for e in climbing)


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert graph.cycles(graph.read_graph()) == []


def test_every_module_has_a_layer_and_the_readme_names_each_layer() -> None:
    graph = import_graph()
    edges = graph.read_graph()
    modules = {e.source for e in edges} | {e.target for e in edges}
    assert len(modules) > 60  # the scan reads kiln's whole source, not an empty folder
    for module in modules:
        graph.layer_of(module)  # raises for a module in no layer
    readme = (ROOT / "README.md").read_text()
    for name, _ in graph.LAYERS:
        assert f"**{name}**" in readme


def test_an_upward_import_is_found(tmp_path) -> None:
    graph = import_graph()
    package = tmp_path / "kiln"
    (package / "data").mkdir(parents=True)
    (package / "stages").mkdir()
    (package / "data" / "leak.py").write_text("def f():\n    from kiln.stages import train\n")
    (package / "stages" / "train.py").write_text("from kiln.data import leak\n")
    graph.SOURCE = tmp_path
    edges = graph.read_graph()
    assert [(e.source, e.target, e.in_function) for e in graph.upward(edges)] == [
        ("kiln.data.leak", "kiln.stages.train", True)
    ]
    assert graph.cycles(edges) == [["kiln.data.leak", "kiln.stages.train"]]
