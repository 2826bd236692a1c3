"""The shape DESIGN.md promises, read from the code: no two modules import each other (even
through others), the collector imports nothing of the actuator but in the command-line
dispatcher, and no collector code names a writer of the actuator's state (the deployed
record, the deploy results, the journal, the reboot state, the history, the profile)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("collector", "actuator")
DISPATCHER = "collector.cli"
# The functions that write the actuator's state: all of records.py's, and these.
WRITERS = {
    "actuator.profile": {"set_to"},
    "actuator.transaction": {"advance", "complete", "fail", "undo", "roll_back"},
    "actuator.trial": {"mark", "unmark", "forget"},
}
# What the dispatcher may take from the actuator: the deploy command and collect --track.
DISPATCHED = {"actuator.deploy": {"deploy"}, "actuator.records": {"adopt_untracked"}}


def modules() -> dict[str, Path]:
    return {
        ".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): f
        for package in PACKAGES
        for f in sorted((REPO / package).rglob("*.py"))
    }


def imports(name: str, source: str) -> Iterator[tuple[str, str | None]]:
    """(module, imported name or None) for each import in source, relative ones resolved."""
    package = name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]).strip(".")
            for alias in node.names:
                yield base, alias.name


def dependencies() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        found = set()
        for module, imported in imports(name, path.read_text()):
            for candidate in (f"{module}.{imported}", module):
                if candidate in known and candidate != name:
                    found.add(candidate)
                    break
        graph[name] = found
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each module that reaches itself, with the path back."""
    found = []
    for start in graph:
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    found.append([*path, start])
                    stack.clear()
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return found


def test_no_module_reaches_itself_through_its_imports() -> None:
    graph = dependencies()
    assert len(graph) > 20 and any(graph.values()), "the scan found the modules"
    assert circles(graph) == []


def test_a_circle_is_found() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) != []


def collector_imports_of_the_actuator() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, path in modules().items():
        if name.startswith("collector"):
            for module, imported in imports(name, path.read_text()):
                if module.split(".")[0] == "actuator":
                    found.setdefault(name, set()).add(f"{module}:{imported}")
    return found


def test_the_collector_imports_the_actuator_only_in_the_dispatcher() -> None:
    used = collector_imports_of_the_actuator()
    assert set(used) == {DISPATCHER}
    allowed = {f"{m}:{n}" for m, names in DISPATCHED.items() for n in names}
    assert used[DISPATCHER] <= allowed


def functions(module: str) -> set[str]:
    tree = ast.parse(modules()[module].read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def writer_names() -> set[str]:
    records = {name for name in functions("actuator.records") if not name.startswith("_")}
    return records.union(*WRITERS.values())


def named_writers(source: str, writers: set[str]) -> set[str]:
    """The writers source calls, by name or as an attribute."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            called = node.func
            if isinstance(called, ast.Name) and called.id in writers:
                found.add(called.id)
            elif isinstance(called, ast.Attribute) and called.attr in writers:
                found.add(called.attr)
    return found


def test_the_writers_are_the_actuators() -> None:
    for module, names in WRITERS.items():
        assert names <= functions(module), f"{module} renamed a writer: update WRITERS"
    assert {"save_deployed", "record_result", "save_reboot_state", "note"} <= writer_names()


@pytest.mark.parametrize(
    "name", [n for n in modules() if n.startswith("collector") and n != DISPATCHER]
)
def test_no_collector_module_calls_a_writer_of_actuator_state(name: str) -> None:
    source = modules()[name].read_text()
    assert named_writers(source, writer_names()) == set()
    assert '"nix-env"' not in source, "the profile is the actuator's"


def test_a_collector_that_wrote_the_deployed_record_would_be_caught() -> None:
    copied = "from x import records\ndef tracked(p):\n    records.save_deployed(p, None)\n"
    assert named_writers(copied, writer_names()) == {"save_deployed"}


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in tests/harness."""
    found = {
        f"{path.name} imports {module}"
        for path in sorted((REPO / "tests").glob("test_*.py"))
        for module, _ in imports(path.stem, path.read_text())
        if module.split(".")[0].startswith("test_")
    }
    assert len(list((REPO / "tests").glob("test_*.py"))) > 20
    assert found == set()
