"""Settings from the command line and the config file (flags win), and the paths they imply."""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .errors import ConfigError

STATE_DIR = "/var/lib/nixos-autodeploy"

E = TypeVar("E", bound="StrEnum")


class SwitchMode(StrEnum):
    SWITCH = "switch"
    BOOT = "boot"
    SMART = "smart"


class RebootMode(StrEnum):
    REBOOT = "reboot"
    KEXEC = "kexec"


@dataclass(frozen=True)
class Paths:
    """Every path the agent touches, under --root (the Nix store stays the machine's)."""

    root: str
    state_dir: str
    # Where the agent's own links (upstream GC root, deployed mirror) live; None: /run
    # under root, the original tool's places. The module gives the sandboxed collector a
    # directory of its own and links the old places to it.
    runtime_dir: str | None = None

    def under_root(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    @property
    def current(self) -> str:
        return self.under_root("/run/current-system")

    @property
    def booted(self) -> str:
        return self.under_root("/run/booted-system")

    def own_link(self, name: str) -> str:
        if self.runtime_dir is not None:
            return os.path.join(self.runtime_dir, name)
        return self.under_root(f"/run/{name}")

    @property
    def upstream(self) -> str:
        return self.own_link("upstream-system")

    @property
    def deployed_link(self) -> str:
        return self.own_link("deployed-system")

    @property
    def profile(self) -> str:
        return self.under_root("/nix/var/nix/profiles/system")

    @property
    def systemd_running(self) -> bool:
        return os.path.isdir(self.under_root("/run/systemd/system"))

    def state(self, name: str) -> str:
        return os.path.join(self.state_dir, name)


@dataclass(frozen=True)
class HealthSettings:
    """What the actuator checks after a switch or a trial boot (actuator/health.py)."""

    enabled: bool = True
    commands: tuple[str, ...] = ()  # run with sh -c; exit 0 passes
    urls: tuple[str, ...] = ()  # a 2xx passes
    units: tuple[str, ...] = ()  # active passes
    ignore_units: tuple[str, ...] = ()  # failed units systemd's verdict overlooks
    timeout: float = 300.0


@dataclass(frozen=True)
class Settings:
    paths: Paths
    url: str | None = None
    timeout: float = 60.0
    netrc_file: str | None = None
    bearer_token_file: str | None = None
    ca_file: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    prometheus_path: str | None = None
    switch_mode: SwitchMode = SwitchMode.SWITCH
    reboot_mode: RebootMode | None = None
    max_snapshot_age: float = 3600.0
    reboot_windows: tuple[str, ...] = ()  # checked by the actuator (actuator/window.py)
    fleet_lock_url: str | None = None
    fleet_lock_group: str = "default"
    track: bool = False
    every: float | None = None  # collect: stay resident, poll every so many seconds
    force: bool = False
    dry_run: bool = False
    health: HealthSettings = HealthSettings()


_FILE_KEYS: dict[str, type | tuple[type, ...]] = {
    "url": str,
    "timeout": (int, float),
    "netrc_file": str,
    "bearer_token_file": str,
    "ca_file": str,
    "headers": list,
    "prometheus_path": str,
    "root": str,
    "state_dir": str,
    "runtime_dir": str,
    "switch_mode": str,
    "reboot_mode": str,
    "max_snapshot_age": (int, float),
    "reboot_windows": list,
    "fleet_lock_url": str,
    "fleet_lock_group": str,
    "track": bool,
    "every": (int, float),
    "health_checks": bool,
    "health_commands": list,
    "health_urls": list,
    "health_units": list,
    "health_ignore_units": list,
    "health_timeout": (int, float),
}


def load_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".toml"):
            import tomllib  # only here: it costs the every-5-minutes collector 6 ms

            data = tomllib.loads(raw.decode())
        else:
            data = json.loads(raw)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected an object at the top level")
    for key, value in data.items():
        expected = _FILE_KEYS.get(key)
        if expected is None:
            raise ConfigError(f"config file {path}: unknown key {key!r}")
        wrong_bool = isinstance(value, bool) and expected is not bool
        if value is not None and (wrong_bool or not isinstance(value, expected)):
            raise ConfigError(f"config file {path}: {key} has the wrong type")
    return data


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if (
        not sep
        or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name)
        or re.search(r"[\r\n\0]", value)
    ):
        raise ConfigError(f"invalid header {text.split(':')[0][:40]!r}: expected 'Name: value'")
    return name, value.strip()


# The original tool's spellings (its clap enum wrote kexec as k-exec).
_ALIASES = {"k-exec": "kexec"}


def _enum(kind: type[E], value: str, what: str) -> E:
    try:
        return kind(_ALIASES.get(value, value))
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise ConfigError(f"{what} must be one of {choices}, not {value!r}") from None


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{what} must be a list of non-empty strings")
    return tuple(value)


def _health(pick: Any) -> HealthSettings:
    timeout = float(pick("health_timeout", 300.0))
    if timeout <= 0:
        raise ConfigError("health timeout must be positive")
    urls = _strings(pick("health_urls", []), "health URLs")
    for url in urls:
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise ConfigError(f"health URL {url[:80]!r} is not an http or https URL")
    return HealthSettings(
        enabled=bool(pick("health_checks", True)),
        commands=_strings(pick("health_commands", []), "health commands"),
        urls=urls,
        units=_strings(pick("health_units", []), "health units"),
        ignore_units=_strings(pick("health_ignore_units", []), "ignored units"),
        timeout=timeout,
    )


def settings_from(args: argparse.Namespace) -> Settings:
    """Merge the parsed flags over the config file; absent flags are None."""
    file = load_config_file(args.config) if getattr(args, "config", None) else {}

    def pick(key: str, default: Any = None) -> Any:
        flag = getattr(args, key, None)
        value = flag if flag not in (None, []) else file.get(key)
        return default if value is None else value

    root = os.path.abspath(pick("root", "/"))
    state_dir = pick("state_dir") or os.path.join(root, STATE_DIR.lstrip("/"))
    runtime_dir = pick("runtime_dir")
    url, positional = pick("url"), getattr(args, "url_argument", None)
    if positional is not None:
        # The original tool took the URL as its argument; a different --url is a mistake.
        if getattr(args, "url", None) not in (None, positional):
            raise ConfigError("the URL is given twice (--url and as an argument): give it once")
        url = positional
    headers = pick("headers", [])
    if not all(isinstance(h, str) for h in headers):
        raise ConfigError("headers must be a list of 'Name: value' strings")
    timeout = float(pick("timeout", 60.0))
    if timeout <= 0:
        raise ConfigError("timeout must be positive")
    max_snapshot_age = float(pick("max_snapshot_age", 3600.0))
    if max_snapshot_age < 0:
        raise ConfigError("max snapshot age must not be negative")
    every = pick("every")
    if every is not None and not 0 < float(every) < float("inf"):
        raise ConfigError(f"every must be a positive number of seconds, not {every}")
    switch_mode = _enum(SwitchMode, pick("switch_mode", "switch"), "switch mode")
    windows = pick("reboot_windows", [])
    if not all(isinstance(w, str) for w in windows):
        raise ConfigError("reboot_windows must be a list of '[DAYS ]HH:MM-HH:MM' strings")
    fleet_lock_url = pick("fleet_lock_url")
    if fleet_lock_url is not None and not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", fleet_lock_url):
        raise ConfigError("the fleet lock URL must be an http:// or https:// URL")
    group = pick("fleet_lock_group", "default")
    # The FleetLock protocol's rule for a group name.
    if not re.fullmatch(r"[a-zA-Z0-9.-]+", group):
        raise ConfigError(f"fleet lock group {group[:40]!r}: only letters, digits, '.' and '-'")
    reboot = pick("reboot_mode")
    return Settings(
        paths=Paths(
            root=root,
            state_dir=os.path.abspath(state_dir),
            runtime_dir=None if runtime_dir is None else os.path.abspath(runtime_dir),
        ),
        url=url,
        timeout=timeout,
        netrc_file=pick("netrc_file"),
        bearer_token_file=pick("bearer_token_file"),
        ca_file=pick("ca_file"),
        headers=tuple(parse_header(h) for h in headers),
        prometheus_path=pick("prometheus_path"),
        switch_mode=switch_mode,
        reboot_mode=_enum(RebootMode, reboot, "reboot mode") if reboot else None,
        max_snapshot_age=max_snapshot_age,
        reboot_windows=tuple(windows),
        fleet_lock_url=fleet_lock_url,
        fleet_lock_group=group,
        track=bool(pick("track", False)),
        every=None if every is None else float(every),
        force=bool(getattr(args, "force", False)),
        dry_run=bool(getattr(args, "dry_run", False)),
        health=_health(pick),
    )
