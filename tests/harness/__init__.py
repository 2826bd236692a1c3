"""Test harness: real Nix, a signed binary cache over HTTP, a sandbox host."""

from .fleetlock import FAULTS, Fault, FleetLockServer, LockRequest
from .host import (
    AgentResult,
    Host,
    error_lines,
    metric,
    point_link,
    read_link,
    resolve_link,
    standalone_host,
)
from .nix import (
    NixBuilder,
    Package,
    SigningKey,
    System,
    SystemSpec,
    register_closure,
    require,
    require_tool,
    run_checked,
    store_paths,
)
from .server import RecordedRequest, Reply, TestServer, etag_for

__all__ = [
    "FAULTS",
    "AgentResult",
    "Fault",
    "FleetLockServer",
    "Host",
    "LockRequest",
    "NixBuilder",
    "Package",
    "RecordedRequest",
    "Reply",
    "SigningKey",
    "System",
    "SystemSpec",
    "TestServer",
    "error_lines",
    "etag_for",
    "metric",
    "point_link",
    "read_link",
    "register_closure",
    "require",
    "require_tool",
    "resolve_link",
    "run_checked",
    "standalone_host",
    "store_paths",
]
