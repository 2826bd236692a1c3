"""Test harness: real Nix, a signed binary cache over HTTP, a sandbox host."""

from .host import AgentResult, Host, point_link, read_link, resolve_link
from .nix import NixBuilder, SigningKey, System, SystemSpec, require_tool, run_checked
from .server import RecordedRequest, Reply, TestServer, etag_for

__all__ = [
    "AgentResult",
    "Host",
    "NixBuilder",
    "RecordedRequest",
    "Reply",
    "SigningKey",
    "System",
    "SystemSpec",
    "TestServer",
    "etag_for",
    "point_link",
    "read_link",
    "require_tool",
    "resolve_link",
    "run_checked",
]
