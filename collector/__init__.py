"""Observe a NixOS host: upstream, system links, state, snapshot and metrics."""

__version__ = "0.1.0"
