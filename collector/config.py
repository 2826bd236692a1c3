"""Settings from the command line and the config file (flags win), and the paths they imply.

Each option is declared once, in OPTIONS: its flags and help, the subcommands that take it,
its config-file key and type, and the Settings field its value fills. The subcommands'
parsers (add_options), the config file's check (load_config_file) and Settings
(settings_from) are all made from that table."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import groupby
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
    # Where the boot loader copies kernels and initrds: /boot, or the ESP (or XBOOTLDR)
    # systemd-boot uses; the module reads it from the boot loader's configuration.
    boot_dir: str = "/boot"

    def under_root(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    @property
    def boot(self) -> str:
        return self.under_root(self.boot_dir)

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
    prometheus_url: str | None = None  # the fleet's Prometheus (collector/prometheus.py)
    prometheus_bearer_token_file: str | None = None
    prometheus_netrc_file: str | None = None
    prometheus_ca_file: str | None = None
    halt_query: str | None = None  # PromQL; a non-zero sample halts a new deploy
    rollout_wariness: float | None = None  # a release's wave; None: from the host's ID
    track: bool = False
    every: float | None = None  # collect: stay resident, poll every so many seconds
    force: bool = False
    dry_run: bool = False
    min_free_store: int = 1 << 30  # bytes a realise must leave free (collector/space.py)
    min_free_boot: int = 16 << 20  # bytes a boot loader install must leave free
    keep_generations: int = 10  # the agent's profile generations kept; 0: never removed
    prune_foreign: bool = False  # remove generations the agent did not make too
    health: HealthSettings = HealthSettings()
    # Signed releases (collector/release.py): with keys, only a verified release counts.
    trusted_keys: tuple[str, ...] = ()
    trusted_keys_file: str | None = None
    signatures_required: int = 1
    host_name: str | None = None


# ---- the options ---------------------------------------------------------------------

COMMANDS = ("collect", "status", "diff", "log", "deploy", "fleet", "publish", "verify")
FETCHING = ("collect", "deploy")  # they fetch upstream
JUDGING = (*FETCHING, "verify")  # they judge a signed release
REPORTS = ("status", "diff", "log", "fleet")
DEPLOY = ("deploy",)
PROMETHEUS = ("deploy", "fleet")  # the commands that ask the fleet's Prometheus
FLEET = ("fleet",)

SYSTEM_NAMES = ("current", "booted", "deployed", "upstream", "profile")  # as `diff` takes them

NUMBER = (int, float)  # a number in JSON or TOML: 60 and 60.0 alike
HEALTH = "health checks after a switch or a trial boot"  # the title of their group in --help


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


# Parsers of a flag's word (argparse's `type`: a bad word is a usage error) and checks of a
# value, from a flag or the config file (a bad one is a ConfigError). A check gets a value of
# the option's file_type (load_config_file made sure) or what its parser made of the word.


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return n


def _serial(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise argparse.ArgumentTypeError(f"not a release serial: {text!r}")
    return int(text)


def _unix_seconds(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,12}", text):
        raise argparse.ArgumentTypeError(f"not Unix seconds: {text!r}")
    return int(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"not a fraction above 0 and at most 1: {text!r}")
    return value


def _selector(text: str) -> str:
    if not text:  # every series (argparse passes the default through here too)
        return text
    if not re.fullmatch(r"\{.*\}", text.strip(), re.S):
        raise argparse.ArgumentTypeError(f"not a label selector like '{{job=\"node\"}}': {text!r}")
    return text.strip()


_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    """`3600`, `90s`, `30m`, `12h`, `7d`, `2w`: seconds."""
    found = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([smhdw]?)", text.strip())
    if not found or float(found.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration (like 3600, 30m, 12h, 7d): {text!r}")
    return float(found.group(1)) * _SECONDS[found.group(2) or "s"]


def _positive(what: str) -> Callable[[float], float]:
    def check(value: float) -> float:
        if value <= 0:
            raise ConfigError(f"{what} must be positive")
        return float(value)

    return check


def _not_negative(what: str) -> Callable[[float], float]:
    def check(value: float) -> float:
        if value < 0:
            raise ConfigError(f"{what} must not be negative")
        return float(value)

    return check


def _every(value: float) -> float:
    if not 0 < value < float("inf"):
        raise ConfigError(f"every must be a positive number of seconds, not {value}")
    return float(value)


_BYTES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(value: int | str) -> int:
    """A size in bytes: a number, or one with K, M, G or T (binary: 1K = 1024) after it."""
    if isinstance(value, int):
        found = re.fullmatch(r"(\d+)()", str(value))
    else:
        found = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:i?B)?", value.strip(), re.IGNORECASE)
    if found is None:
        raise ConfigError(f"not a size: {str(value)[:40]!r} (e.g. 1G, 512M, 1048576)")
    return int(found.group(1)) * _BYTES[found.group(2).upper()]


def _generations(value: int) -> int:
    if value < 0:
        raise ConfigError("keep generations must not be negative (0: never remove any)")
    return value


def _one_of(kind: type[E], what: str) -> Callable[[str], E]:
    return lambda value: _enum(kind, value, what)


def _reboot_mode(value: str) -> RebootMode | None:
    return _enum(RebootMode, value, "reboot mode") if value else None


def _strings(values: Sequence[object], error: str, blank: bool = True) -> tuple[str, ...]:
    strings = tuple(v for v in values if isinstance(v, str) and (blank or v.strip()))
    if len(strings) < len(values):
        raise ConfigError(error)
    return strings


def _headers(values: Sequence[object]) -> tuple[tuple[str, str], ...]:
    texts = _strings(values, "headers must be a list of 'Name: value' strings")
    return tuple(parse_header(text) for text in texts)


def _windows(values: Sequence[object]) -> tuple[str, ...]:
    # Their syntax is the actuator's (actuator/window.py), checked when it reboots.
    return _strings(values, "reboot_windows must be a list of '[DAYS ]HH:MM-HH:MM' strings")


def _nonblank(what: str) -> Callable[[Sequence[object]], tuple[str, ...]]:
    return lambda values: _strings(values, f"{what} must be a list of non-empty strings", False)


def _health_urls(values: Sequence[object]) -> tuple[str, ...]:
    urls = _nonblank("health URLs")(values)
    for url in urls:
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise ConfigError(f"health URL {url[:80]!r} is not an http or https URL")
    return urls


def _trusted_keys(values: Sequence[object]) -> tuple[str, ...]:
    # Their format is checked where they are used (collector/release.py), one line each.
    return _strings(values, "trusted_keys must be a list of 'NAME:BASE64' strings", False)


def _signatures_required(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"signatures required must be a positive integer, not {value!r}")
    return value


def _host_name(value: str) -> str:
    if not re.fullmatch(r"[^\s/]{1,253}", value) or value == "*":
        raise ConfigError(f"host name {value[:40]!r} is not a host name")
    return value


def _fleet_lock_url(value: str) -> str:
    if not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", value):
        raise ConfigError("the fleet lock URL must be an http:// or https:// URL")
    return value


def _prometheus_url(value: str) -> str:
    if not re.fullmatch(r"https?://[^\s/?#]+[^\s?#]*", value):
        raise ConfigError("the Prometheus URL must be an http:// or https:// URL without a query")
    return value


def _halt_query(value: str) -> str:
    if not value.strip():
        raise ConfigError("the halt query must not be empty")
    return value


def _wariness(value: float) -> float:
    if not 0 <= value <= 1:
        raise ConfigError(f"the rollout wariness must be from 0 to 1, not {value}")
    return float(value)


def _fleet_lock_group(value: str) -> str:
    # The FleetLock protocol's rule for a group name.
    if not re.fullmatch(r"[a-zA-Z0-9.-]+", value):
        raise ConfigError(f"fleet lock group {value[:40]!r}: only letters, digits, '.' and '-'")
    return value


# No generated __eq__, __hash__ or __repr__: nothing compares or prints options, and the
# class is made at every start (each generated method costs the one-shot collector).
@dataclass(frozen=True, eq=False, repr=False)
class Option:
    """One option, declared once: on the command line, in the config file, in Settings.

    Its value is the flag's, else the config file's, else `default`, made the Settings
    field's value by `check` (also the place for rules of its own: a positive timeout)."""

    name: str  # the config file's key and argparse's dest
    flags: tuple[str, ...]  # its spellings, short and legacy ones first; (): a positional
    help: str | None
    commands: tuple[str, ...] = COMMANDS  # the subcommands that take it
    metavar: str | None = None
    parse: Callable[[str], object] | None = None  # a flag's word to its value; None: as is
    choices: tuple[str, ...] | None = None
    switch: bool | None = None  # a flag without a word: the value it sets
    repeat: bool = False  # a flag given again adds to a list; a positional: any number
    default: object = None  # neither flag nor file: this (for a setting, Settings' own)
    file_type: type | tuple[type, ...] | None = str  # its key's value; None: no key
    # Gets a value of file_type or what parse made; raises ConfigError. None: taken as is.
    check: Callable[[Any], object] | None = None
    # The Settings field it fills: "" the one of its name, "paths.F" or "health.F" in the
    # nested ones; None: none, the option is the command's own (--config, --json).
    field: str | None = ""
    group: str | None = None  # the title of its group in --help

    @property
    def setting(self) -> str | None:
        """Its field in Settings, dotted for a nested one ("health.enabled")."""
        return None if self.field is None else self.field or self.name


# In --help's order. A new setting is an entry here and its field in Settings (or Paths,
# HealthSettings); tests/test_settings.py wants a sample of it, and checks that module.nix
# hands the program only what is here.
OPTIONS: tuple[Option, ...] = (
    # Every command's.
    Option(
        "root",
        ("--root",),
        "manage the system mounted at DIR (/)",
        metavar="DIR",
        default="/",
        check=os.path.abspath,
        field="paths.root",
    ),
    # Its default is under root: settings_from.
    Option(
        "state_dir", ("--state-dir",), "state directory", metavar="DIR", field="paths.state_dir"
    ),
    Option(
        "runtime_dir",
        ("--runtime-dir",),
        "keep upstream-system and deployed-system here (/run)",
        metavar="DIR",
        check=os.path.abspath,
        field="paths.runtime_dir",
    ),
    Option(
        "config",
        ("--config",),
        "JSON or TOML config file",
        metavar="FILE",
        file_type=None,
        field=None,
    ),
    Option(
        "debug",
        ("--debug",),
        "log more, show tracebacks",
        switch=True,
        default=False,
        file_type=None,
        field=None,
    ),
    Option(
        "quiet",
        ("-q", "--quiet"),
        "only warnings and errors; no progress display",
        switch=True,
        default=False,
        file_type=None,
        field=None,
    ),
    # Fetching upstream.
    Option("url", ("--url",), "URL that serves the upstream store path", FETCHING),
    Option(
        "timeout",
        ("--timeout",),
        "total deadline (60)",
        FETCHING,
        metavar="SECONDS",
        parse=float,
        file_type=NUMBER,
        default=60.0,
        check=_positive("timeout"),
    ),
    Option(
        "netrc_file",
        ("--netrc-file",),
        "credentials for the URL's host",
        FETCHING,
        metavar="FILE",
    ),
    Option(
        "bearer_token_file",
        ("--bearer-token-file",),
        "send this bearer token",
        FETCHING,
        metavar="FILE",
    ),
    Option(
        "headers",
        ("--header",),
        "extra request header (repeatable)",
        FETCHING,
        metavar="'NAME: VALUE'",
        repeat=True,
        file_type=list,
        default=(),
        check=_headers,
    ),
    Option("ca_file", ("--ca-file",), "CA bundle for https", FETCHING, metavar="FILE"),
    Option(
        "prometheus_path",
        ("--prometheus-path",),
        "node_exporter textfile",
        FETCHING,
        metavar="FILE",
    ),
    # The original tool's form, `nixos-autodeploy [OPTIONS] URL`: settings_from makes it url.
    Option(
        "url_argument",
        (),
        "same as --url",
        FETCHING,
        metavar="URL",
        file_type=None,
        field=None,
    ),
    # Signed releases: what upstream must be signed by, and which entry is this host's.
    Option(
        "trusted_keys",
        ("--trusted-key",),
        "accept only releases signed by this Nix public key (repeatable)",
        JUDGING,
        metavar="NAME:BASE64",
        repeat=True,
        file_type=list,
        default=(),
        check=_trusted_keys,
    ),
    Option(
        "trusted_keys_file",
        ("--trusted-keys-file",),
        "more trusted keys, one a line",
        JUDGING,
        metavar="FILE",
    ),
    Option(
        "signatures_required",
        ("--signatures-required",),
        "valid signatures from distinct trusted keys a release needs (1)",
        JUDGING,
        metavar="N",
        parse=_count,
        file_type=int,
        default=1,
        check=_signatures_required,
    ),
    Option(
        "host_name",
        ("--host-name",),
        "this host's entry in a release (the hostname under --root)",
        JUDGING,
        metavar="NAME",
        check=_host_name,
    ),
    # publish's (CI's): orders for one run, not settings.
    Option(
        "key_files",
        ("--key-file",),
        "sign with this Nix secret key (repeatable)",
        ("publish",),
        metavar="FILE",
        repeat=True,
        file_type=None,
        field=None,
    ),
    Option(
        "serial",
        ("--serial",),
        "the release's serial, higher than every one before",
        ("publish",),
        metavar="N",
        parse=_serial,
        file_type=None,
        field=None,
    ),
    Option(
        "serial_from",
        ("--serial-from",),
        "read the last serial from FILE, publish the next one, write it back",
        ("publish",),
        metavar="FILE",
        file_type=None,
        field=None,
    ),
    Option(
        "expires_in",
        ("--expires-in",),
        "how long the release is valid (7d; s, m, h, d)",
        ("publish",),
        metavar="DURATION",
        parse=duration,
        default=7 * 86400.0,
        file_type=None,
        field=None,
    ),
    Option(
        "rollout_duration",
        ("--rollout-duration",),
        "roll the release out over this long (a wave: 12h; s, m, h, d)",
        ("publish",),
        metavar="DURATION",
        parse=duration,
        file_type=None,
        field=None,
    ),
    Option(
        "rollout_start",
        ("--rollout-start",),
        "the wave starts at these Unix seconds (default: now)",
        ("publish",),
        metavar="UNIX",
        parse=_unix_seconds,
        file_type=None,
        field=None,
    ),
    Option(
        "system",
        ("--system",),
        "the system of every host not named by --host",
        ("publish",),
        metavar="PATH",
        file_type=None,
        field=None,
    ),
    Option(
        "hosts",
        ("--host",),
        "this host's system (repeatable)",
        ("publish",),
        metavar="NAME=PATH",
        repeat=True,
        file_type=None,
        field=None,
    ),
    Option(
        "output",
        ("-o", "--output"),
        "write the signed release here (atomically), not to stdout",
        ("publish",),
        metavar="FILE",
        file_type=None,
        field=None,
    ),
    Option(
        "release_file",
        (),
        "the signed release to check",
        ("verify",),
        metavar="FILE",
        file_type=None,
        field=None,
    ),
    # collect's.
    Option(
        "track",
        ("--track",),
        "record what runs as deployed when it is upstream (hosts without the actuator)",
        ("collect",),
        switch=True,
        file_type=bool,
        default=False,
    ),
    Option(
        "every",
        ("--every",),
        "stay resident and collect every SECONDS (SIGHUP: now; SIGTERM: stop)",
        ("collect",),
        metavar="SECONDS",
        parse=float,
        file_type=NUMBER,
        check=_every,
    ),
    Option(
        "boot_dir",
        ("--boot-dir",),
        "the boot filesystem's mount point, where kernels and initrds go (/boot)",
        FETCHING,
        metavar="DIR",
        default="/boot",
        check=os.path.abspath,
        field="paths.boot_dir",
    ),
    Option(
        "min_free_store",
        ("--min-free-store",),
        "leave this much free on the store's filesystem; refuse a realise that would not (1G)",
        FETCHING,
        metavar="SIZE",
        file_type=(int, str),
        default=1 << 30,
        check=_size,
    ),
    # The reports'.
    Option(
        "json",
        ("--json",),
        "print JSON for scripts",
        REPORTS,
        switch=True,
        default=False,
        file_type=None,
        field=None,
    ),
    Option(
        "systems",
        (),
        f"{', '.join(SYSTEM_NAMES)} or a store path (current upstream)",
        ("diff",),
        metavar="FROM TO",
        repeat=True,
        file_type=None,
        field=None,
    ),
    Option(
        "n",
        ("-n",),
        "last N entries (20)",
        ("log",),
        metavar="N",
        parse=_count,
        default=20,
        file_type=None,
        field=None,
    ),
    # fleet's: the hosts the metrics name, and the promotion gate.
    Option(
        "selector",
        ("--selector",),
        "only the series these labels select, as PromQL writes them: '{job=\"node\"}'",
        FLEET,
        metavar="SELECTOR",
        parse=_selector,
        default="",
        file_type=None,
        field=None,
    ),
    Option(
        "wait_serial",
        ("--wait-serial",),
        "wait until --fraction of the hosts run release serial N, up to date",
        FLEET,
        metavar="N",
        parse=_serial,
        file_type=None,
        field=None,
    ),
    Option(
        "fraction",
        ("--fraction",),
        "with --wait-serial: the share of the hosts that must be done (1.0)",
        FLEET,
        metavar="F",
        parse=_fraction,
        default=1.0,
        file_type=None,
        field=None,
    ),
    Option(
        "wait_timeout",
        ("--timeout",),
        "with --wait-serial: give up after this long (1h; 90s, 15m, 2h)",
        FLEET,
        metavar="DURATION",
        parse=duration,
        default=3600.0,
        file_type=None,
        field=None,
    ),
    Option(
        "interval",
        ("--interval",),
        "with --wait-serial: ask Prometheus every SECONDS (10)",
        FLEET,
        metavar="SECONDS",
        parse=duration,
        default=10.0,
        file_type=None,
        field=None,
    ),
    # deploy's. The short flags and k-exec are the original tool's, kept so its extraArgs
    # still work.
    Option(
        "switch_mode",
        ("-s", "--switch-mode"),
        None,
        DEPLOY,
        choices=tuple(mode.value for mode in SwitchMode),
        default=SwitchMode.SWITCH,
        check=_one_of(SwitchMode, "switch mode"),
    ),
    Option(
        "reboot_mode",
        ("-r", "--reboot-mode"),
        None,
        DEPLOY,
        choices=(*(mode.value for mode in RebootMode), *_ALIASES),
        check=_reboot_mode,
    ),
    Option(
        "reboot_windows",
        ("--reboot-window",),
        "reboot or kexec only inside this local-time window (repeatable)",
        DEPLOY,
        metavar="'[DAYS ]HH:MM-HH:MM'",
        repeat=True,
        file_type=list,
        default=(),
        check=_windows,
    ),
    Option(
        "min_free_boot",
        ("--min-free-boot",),
        "leave this much free on the boot filesystem; prune, then refuse a deploy (16M)",
        DEPLOY,
        metavar="SIZE",
        file_type=(int, str),
        default=16 << 20,
        check=_size,
    ),
    Option(
        "keep_generations",
        ("--keep-generations",),
        "after a confirmed deploy keep the newest N system generations (10; 0: all)",
        DEPLOY,
        metavar="N",
        parse=int,
        file_type=int,
        default=10,
        check=_generations,
    ),
    Option(
        "prune_foreign",
        ("--prune-foreign",),
        "remove generations the agent did not make too",
        DEPLOY,
        switch=True,
        file_type=bool,
        default=False,
    ),
    Option(
        "fleet_lock_url",
        ("--fleet-lock-url",),
        "take a reboot slot from this FleetLock server",
        DEPLOY,
        metavar="URL",
        check=_fleet_lock_url,
    ),
    Option(
        "fleet_lock_group",
        ("--fleet-lock-group",),
        "FleetLock reboot group (default)",
        DEPLOY,
        metavar="NAME",
        default="default",
        check=_fleet_lock_group,
    ),
    # The fleet's Prometheus: its HTTP API answers the halt query (the same API as Thanos,
    # Mimir, VictoriaMetrics). Its credentials and CA are its own, not upstream's.
    Option(
        "prometheus_url",
        ("--prometheus-url",),
        "the fleet's Prometheus HTTP API (its base URL)",
        PROMETHEUS,
        metavar="URL",
        check=_prometheus_url,
    ),
    Option(
        "prometheus_bearer_token_file",
        ("--prometheus-bearer-token-file",),
        "send this bearer token to Prometheus",
        PROMETHEUS,
        metavar="FILE",
    ),
    Option(
        "prometheus_netrc_file",
        ("--prometheus-netrc-file",),
        "credentials for Prometheus's host",
        PROMETHEUS,
        metavar="FILE",
    ),
    Option(
        "prometheus_ca_file",
        ("--prometheus-ca-file",),
        "CA bundle for Prometheus over https (--ca-file)",
        PROMETHEUS,
        metavar="FILE",
    ),
    Option(
        "halt_query",
        ("--halt-query",),
        "before a new deploy, ask Prometheus this; any non-zero sample (or no answer) halts it",
        PROMETHEUS,
        metavar="PROMQL",
        check=_halt_query,
    ),
    Option(
        "rollout_wariness",
        ("--rollout-wariness",),
        "this host's place in a release's wave: 0 first (canaries), 1 last (from its ID)",
        DEPLOY,
        metavar="W",
        parse=float,
        file_type=NUMBER,
        check=_wariness,
    ),
    # Orders for one run, not settings: the config file has no key for them.
    Option(
        "force",
        ("-f", "--force"),
        "deploy even if the host is dirty",
        DEPLOY,
        switch=True,
        default=False,
        file_type=None,
    ),
    Option(
        "dry_run",
        ("--dry-run",),
        "say what would be done, do nothing",
        DEPLOY,
        switch=True,
        default=False,
        file_type=None,
    ),
    Option(
        "max_snapshot_age",
        ("--max-snapshot-age",),
        "collect first when the snapshot is older (3600)",
        DEPLOY,
        metavar="SECONDS",
        parse=float,
        file_type=NUMBER,
        default=3600.0,
        check=_not_negative("max snapshot age"),
    ),
    Option(
        "health_commands",
        ("--health-check",),
        "run with sh -c; exit 0 passes (repeatable)",
        DEPLOY,
        metavar="'COMMAND'",
        repeat=True,
        file_type=list,
        default=(),
        check=_nonblank("health commands"),
        field="health.commands",
        group=HEALTH,
    ),
    Option(
        "health_urls",
        ("--health-url",),
        "GET it; a 2xx passes (repeatable)",
        DEPLOY,
        metavar="URL",
        repeat=True,
        file_type=list,
        default=(),
        check=_health_urls,
        field="health.urls",
        group=HEALTH,
    ),
    Option(
        "health_units",
        ("--health-unit",),
        "passes when the unit is active (repeatable)",
        DEPLOY,
        metavar="UNIT",
        repeat=True,
        file_type=list,
        default=(),
        check=_nonblank("health units"),
        field="health.units",
        group=HEALTH,
    ),
    Option(
        "health_ignore_units",
        ("--health-ignore-unit",),
        "failed unit to overlook (repeatable)",
        DEPLOY,
        metavar="UNIT",
        repeat=True,
        file_type=list,
        default=(),
        check=_nonblank("ignored units"),
        field="health.ignore_units",
        group=HEALTH,
    ),
    Option(
        "health_timeout",
        ("--health-timeout",),
        "retry the checks until they all pass or this deadline (300)",
        DEPLOY,
        metavar="SECONDS",
        parse=float,
        file_type=NUMBER,
        default=300.0,
        check=_positive("health timeout"),
        field="health.timeout",
        group=HEALTH,
    ),
    Option(
        "health_checks",
        ("--no-health-checks",),
        "no checks, and so no automatic rollback",
        DEPLOY,
        switch=False,
        file_type=bool,
        default=True,
        field="health.enabled",
        group=HEALTH,
    ),
)


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """Offer the options `command` takes on its parser, in the table's order."""
    taken = (option for option in OPTIONS if command in option.commands)
    for title, options in groupby(taken, key=lambda option: option.group):
        target = parser if title is None else parser.add_argument_group(title)
        for option in options:
            names = option.flags or (option.name,)
            target.add_argument(*names, **_argparse_keywords(option))


def _argparse_keywords(option: Option) -> dict[str, Any]:
    # What the config file may set is None when not given, so the file's value can win.
    keywords: dict[str, Any] = {
        "help": option.help,
        "default": option.default if option.file_type is None else None,
    }
    if option.switch is not None:
        action = "store_true" if option.switch else "store_false"
        return keywords | {"dest": option.name, "action": action}
    keywords |= {"type": option.parse, "choices": option.choices, "metavar": option.metavar}
    if not option.flags:  # a positional: its name is its dest
        return keywords | {"nargs": "*" if option.repeat else "?"}
    return keywords | {"dest": option.name, "action": "append" if option.repeat else "store"}


# The config file's keys and what each holds.
_FILE_KEYS = {option.name: option.file_type for option in OPTIONS if option.file_type is not None}


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


def settings_from(args: argparse.Namespace) -> Settings:
    """Merge the parsed flags over the config file; absent flags are None."""
    file = load_config_file(args.config) if getattr(args, "config", None) else {}
    positional = getattr(args, "url_argument", None)
    # The original tool took the URL as its argument; a different --url is a mistake.
    if positional is not None and getattr(args, "url", None) not in (None, positional):
        raise ConfigError("the URL is given twice (--url and as an argument): give it once")
    # Each setting's value, of its field's type once checked; a subcommand's parser has
    # only the flags it takes, so the others come from the file or the default.
    values = {
        option.name: _value(option, getattr(args, option.name, None), file)
        for option in OPTIONS
        if option.setting is not None
    }
    if positional is not None:
        values["url"] = positional
    given = values["state_dir"]
    if not (isinstance(given, str) and given):  # by default under root
        given = os.path.join(str(values["root"]), STATE_DIR.lstrip("/"))
    values["state_dir"] = os.path.abspath(given)
    return _settings(values)


def _value(option: Option, flag: object, file: Mapping[str, object]) -> object:
    value = flag if flag not in (None, []) else file.get(option.name)
    if value is None:
        value = option.default
    if value is None or option.check is None:
        return value
    return option.check(value)


def _settings(values: Mapping[str, object]) -> Settings:
    """Settings with each value in its option's field."""
    # Any: the fields' types are many; each value was made its own field's type by its check.
    fields: dict[str, dict[str, Any]] = {"": {}, "paths": {}, "health": {}}
    for option in OPTIONS:
        if option.setting is not None:
            part, _, name = option.setting.rpartition(".")
            fields[part][name] = values[option.name]
    return Settings(
        paths=Paths(**fields["paths"]), health=HealthSettings(**fields["health"]), **fields[""]
    )
