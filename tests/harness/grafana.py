"""The dashboards and alert rules in grafana/, as the tests read them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GRAFANA = Path(__file__).resolve().parents[2] / "grafana"
RULES = GRAFANA / "alerts.rules.yml"


def load_dashboard(name: str) -> dict[str, Any]:
    """grafana/NAME, parsed."""
    data = json.loads((GRAFANA / name).read_text())
    assert isinstance(data, dict)
    return data


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])
