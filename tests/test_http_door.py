"""One HTTP door: collector/http.py is the only module that imports requests or urllib3, so
every request the agent makes follows its rules (deadline, CA bundle, where credentials
go, redirects, size caps, retries)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HTTP_LIBRARIES = {"requests", "urllib3"}
DOOR = REPO / "collector" / "http.py"


def imported(source: str) -> set[str]:
    """The top-level names of the packages a module imports (anywhere in it, also inside
    a function or under TYPE_CHECKING); relative imports are the project's own."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def http_importers(root: Path) -> list[Path]:
    """The modules under root/collector and root/actuator that import an HTTP library."""
    return sorted(
        path
        for package in ("collector", "actuator")
        for path in (root / package).rglob("*.py")
        if imported(path.read_text(encoding="utf-8")) & HTTP_LIBRARIES
    )


def test_only_the_http_door_imports_requests_or_urllib3() -> None:
    assert http_importers(REPO) == [DOOR]


def test_the_scan_sees_every_way_of_importing() -> None:
    for source in (
        "import requests",
        "import urllib3.exceptions",
        "import os, requests as r",
        "from requests import Session",
        "from urllib3.util import Retry",
        "def f():\n    import requests\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import urllib3\n",
    ):
        assert imported(source) & HTTP_LIBRARIES, source
    for source in ("import requests_toolbelt_not", "from . import http", "from .http import get"):
        assert not imported(source) & HTTP_LIBRARIES, source


def test_the_scan_fails_on_a_second_door(tmp_path: Path) -> None:
    for package in ("collector", "actuator"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "collector" / "http.py").write_text("import requests\n")
    (tmp_path / "actuator" / "sneaky.py").write_text("from urllib3 import PoolManager\n")
    assert http_importers(tmp_path) == [
        tmp_path / "actuator" / "sneaky.py",
        tmp_path / "collector" / "http.py",
    ]
