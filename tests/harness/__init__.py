"""Test harness: real Nix, a signed binary cache over HTTP, a sandbox host.

The topical modules are imported by name: `harness.deploys` (the actuator run and
inspected), `harness.resident` (the resident collector), `harness.closures` (systems
whose closures differ), `harness.grafana` (the dashboards and rules)."""

from .fleetlock import FAULTS, Fault, FleetLockServer, LockRequest
from .host import (
    REPO,
    AgentResult,
    Host,
    error_lines,
    metric,
    no_traceback,
    point_link,
    read_link,
    resolve_link,
    sandbox_fleet,
    standalone_host,
)
from .nix import (
    NEW_KERNEL,
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
    system_path,
)
from .server import RecordedRequest, Reply, TestServer, etag_for

__all__ = [
    "FAULTS",
    "NEW_KERNEL",
    "REPO",
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
    "no_traceback",
    "point_link",
    "read_link",
    "register_closure",
    "require",
    "require_tool",
    "resolve_link",
    "run_checked",
    "sandbox_fleet",
    "standalone_host",
    "store_paths",
    "system_path",
]
