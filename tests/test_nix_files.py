"""The Nix side: every .nix file parses, module.nix evaluates to the units we promise, and
package.nix agrees with pyproject.toml.

module.nix is evaluated with the real nixpkgs lib (`lib.evalModules`) and stub declarations
of the NixOS options it sets (tests/nix/eval-module.nix). The lib comes from $NIXPKGS_LIB or
`<nixpkgs/lib>`; without either the evaluation tests skip, saying so (nixpkgs cannot be had
on every machine). The generated command lines are then fed to the program's own parser, so
a setting that does not arrive fails here.

package.nix's check phase is run as far as it can be here (its test selection on a copy of
its `src` file set, no Nix on PATH); its `src` itself cannot be evaluated with Nix 2.8
(lib.fileset needs builtins.readFileType), so the file set is read from the text.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, Host, RecordedRequest, Reply, TestServer, require_tool, run_checked
from harness.module_text import module_config_keys

from actuator import window
from collector.cli import build_parser
from collector.config import (
    OPTIONS,
    HealthSettings,
    RebootMode,
    Settings,
    SwitchMode,
    settings_from,
)
from collector.errors import ConfigError

EVAL_MODULE = REPO / "tests" / "nix" / "eval-module.nix"
EVAL_FLAKE = REPO / "tests" / "nix" / "eval-flake.nix"
SKIP_DIRS = {".git", ".venv", ".cache", "node_modules", "result"}

COLLECTOR = "nixos-autodeploy-collector"
ACTUATOR = "nixos-autodeploy"
TRIGGER = "nixos-autodeploy-activated"
RUNTIME_DIR = "/run/nixos-autodeploy"
# The original tool's places, now links into the runtime directory.
OWN_LINKS = [
    f"L+ /run/upstream-system - - - - {RUNTIME_DIR}/upstream-system",
    f"L+ /run/deployed-system - - - - {RUNTIME_DIR}/deployed-system",
]
BOOT = "nixos-autodeploy-boot"  # the actuator once at boot: confirms a trial boot
# What systemd substitutes for %d (the unit's credentials directory).
CREDENTIALS_DIR = "/run/credentials/unit.service"

BASE: dict[str, Any] = {
    "enable": True,
    "url": "https://ci.example.org/hosts/web1/system",
    "prometheusFilePath": "/var/lib/node-exporter/text/nixos-autodeploy.prom",
}
# The one-shot collector started by a timer (the resident one is the default).
TIMER = BASE | {"collector": {"resident": False}}

REBOOT_WITHOUT_ACTUATOR = (
    "system.autoDeploy.rebootMode is set, but system.autoDeploy.actuator.enable is false"
)


def nix_files() -> list[Path]:
    found = []
    for path in sorted(REPO.rglob("*.nix")):
        if not SKIP_DIRS.intersection(path.relative_to(REPO).parts):
            found.append(path)
    return found


def normalize(name: str) -> str:
    """PEP 503 name normalisation; nixpkgs attribute names follow it too."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_dependencies() -> set[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    return {
        normalize(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0]) for spec in project["dependencies"]
    }


def package_nix_dependencies() -> set[str]:
    text = (REPO / "package.nix").read_text()
    block = re.search(r"\bdependencies\s*=\s*with\s+python3Packages;\s*\[(.*?)\];", text, re.S)
    assert block is not None, "package.nix: no `dependencies = with python3Packages; [ ... ];`"
    return {normalize(name) for name in block.group(1).split()}


def test_package_dependencies_match_pyproject() -> None:
    from_pyproject = pyproject_dependencies()
    assert from_pyproject, "pyproject.toml declares no dependencies"
    assert package_nix_dependencies() == from_pyproject


def package_nix_list(attribute: str) -> list[str]:
    """The items of `attribute = [ ... ];` in package.nix (quoted strings or ./paths)."""
    text = (REPO / "package.nix").read_text()
    block = re.search(rf"\b{attribute}\s*=\s*(?:lib\.fileset\.unions\s*)?\[(.*?)\];", text, re.S)
    assert block is not None, f"package.nix has no `{attribute} = [ ... ];`"
    body = re.sub(r"#[^\n]*", "", block.group(1))
    return [quoted or path for quoted, path in re.findall(r'"([^"]*)"|\./([\w./-]+)', body)]


def pytest_addopts(pre_check: str) -> str:
    """What package.nix's preCheck exports as PYTEST_ADDOPTS (its test selection)."""
    found = re.search(r'^\s*export PYTEST_ADDOPTS="([^"]*)"\s*$', pre_check, re.M)
    assert found is not None, f"preCheck exports no PYTEST_ADDOPTS: {pre_check!r}"
    return found.group(1)


def left_out_marks(addopts: str) -> set[str]:
    """The marks `-m 'not a and not b'` leaves out, checked to be nothing but that."""
    flag, expression = shlex.split(addopts)
    assert flag == "-m", addopts
    marks = re.findall(r"\bnot (\w+)", expression)
    assert expression == " and ".join(f"not {mark}" for mark in marks), expression
    return set(marks)


def declared_marks() -> set[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        markers = tomllib.load(f)["tool"]["pytest"]["ini_options"]["markers"]
    return {marker.split(":")[0] for marker in markers}


# What a Nix build sandbox offers a check phase: stdenv's basic tools, no Nix, no systemd,
# no openssl, no mount, no Prometheus.
SANDBOX_TOOLS = [
    "sh",
    "bash",
    "env",
    "cat",
    "ls",
    "mkdir",
    "rm",
    "cp",
    "mv",
    "ln",
    "chmod",
    "touch",
    "sleep",
    "grep",
    "sed",
    "awk",
    "find",
    "xargs",
    "head",
    "tail",
    "sort",
    "uniq",
    "tr",
    "cut",
    "wc",
    "dirname",
    "basename",
    "readlink",
    "realpath",
    "mktemp",
    "id",
    "uname",
    "diff",
    "true",
    "false",
]


def test_package_check_phase_passes_without_nix_tools(tmp_path: Path) -> None:
    """The check phase of package.nix, as far as it can be run here: the tests its
    preCheck selects (PYTEST_ADDOPTS: all but the marked ones), on a copy of exactly the files its
    `src` file set holds, with no Nix (nor any other tool a build sandbox lacks) on PATH and
    no CI variable, as in a Nix build. A test that reads a file outside `src`, or needs a
    tool without being marked, fails or shows up here."""
    src = tmp_path / "src"
    src.mkdir()
    for entry in package_nix_list("fileset"):
        origin = REPO / entry
        if not origin.exists():  # lib.fileset.maybeMissing
            continue
        if origin.is_dir():
            shutil.copytree(origin, src / entry, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, src / entry)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in SANDBOX_TOOLS:
        found = shutil.which(tool)
        if found is not None:
            (bin_dir / tool).symlink_to(found)
    addopts = pytest_addopts((REPO / "package.nix").read_text())
    assert left_out_marks(addopts) == declared_marks()
    env = {"PATH": str(bin_dir), "HOME": "/homeless-shelter", "TMPDIR": str(tmp_path)}
    env["PYTEST_ADDOPTS"] = addopts
    env |= {"LANG": "C.UTF-8", "NIX_STORE_DIR": os.environ.get("NIX_STORE_DIR", "/nix/store")}
    itself = "tests/test_nix_files.py::test_package_check_phase_passes_without_nix_tools"
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs"]
    argv += ["--deselect", itself]
    result = subprocess.run(argv, cwd=src, env=env, capture_output=True, text=True, timeout=600)
    failures = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    assert result.returncode == 0, "\n".join(failures) or result.stdout[-4000:] + result.stderr
    assert re.search(r"\b\d+ passed\b", result.stdout), result.stdout[-2000:]


# --- parsing ------------------------------------------------------------------------------


@pytest.mark.nix
def test_the_nix_files_of_this_issue_exist() -> None:
    names = {path.relative_to(REPO).as_posix() for path in nix_files()}
    expected = {"module.nix", "package.nix", "flake.nix", "test.nix", "tests/nix/eval-module.nix"}
    assert expected <= names


@pytest.mark.nix
@pytest.mark.parametrize("path", nix_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_nix_file_parses(path: Path) -> None:
    nix_instantiate = require_tool("nix-instantiate")
    result = subprocess.run(
        [nix_instantiate, "--parse", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# --- evaluation ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def nixpkgs_lib() -> str:
    nix_instantiate = require_tool("nix-instantiate")
    configured = os.environ.get("NIXPKGS_LIB")
    if configured:
        assert Path(configured, "default.nix").is_file(), f"NIXPKGS_LIB={configured} is no lib"
        return str(Path(configured).resolve())
    found = subprocess.run(
        [nix_instantiate, "--find-file", "nixpkgs/lib"], capture_output=True, text=True
    )
    if found.returncode == 0:
        return found.stdout.strip()
    pytest.skip(
        "no nixpkgs lib: set NIXPKGS_LIB to a nixpkgs lib directory (e.g. a checkout of "
        "nix-community/nixpkgs.lib + /lib) or put nixpkgs on NIX_PATH"
    )


def nix_eval(lib: str, expression: Path, **args: str) -> subprocess.CompletedProcess[str]:
    # --read-write-mode: the generated config files (builtins.toFile) must really be
    # written to the store, so the test can read them back.
    argv = [require_tool("nix-instantiate"), "--eval", "--strict", "--json", "--read-write-mode"]
    argv.append(str(expression))
    argv += ["--argstr", "libPath", lib]
    for name, value in args.items():
        argv += ["--argstr", name, value]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


Evaluate = Callable[..., list[dict[str, Any]]]


@pytest.fixture
def evaluate(nixpkgs_lib: str) -> Evaluate:
    """Evaluate module.nix once per case (the value of system.autoDeploy)."""

    def run(*cases: dict[str, Any]) -> list[dict[str, Any]]:
        result = nix_eval(nixpkgs_lib, EVAL_MODULE, casesJson=json.dumps(list(cases)))
        assert result.returncode == 0, result.stderr
        records: list[dict[str, Any]] = json.loads(result.stdout)
        return records

    return run


def exec_argv(exec_start: str) -> list[str]:
    """Split an ExecStart= line the way systemd does and expand the specifiers it uses; a
    "-" prefix (failure ignored) is dropped from the program."""

    def expand(word: str) -> str:
        def specifier(match: re.Match[str]) -> str:
            known = {"%": "%", "d": CREDENTIALS_DIR}
            assert match.group(1) in known, f"unexpected specifier in {word!r}"
            return known[match.group(1)]

        return re.sub(r"%(.)", specifier, word).replace("$$", "$")

    program, *args = (expand(word) for word in shlex.split(exec_start))
    return [program.removeprefix("-"), *args]


def program_settings(argv: list[str]) -> Settings:
    """What the program makes of the unit's command line (argv[0] is the program)."""
    assert argv[0].endswith("/bin/nixos-autodeploy"), argv
    return settings_from(build_parser().parse_args(argv[1:]))


def config_file(argv: list[str]) -> dict[str, Any]:
    path = argv[argv.index("--config") + 1]
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def test_exec_argv_follows_systemd_quoting() -> None:
    argv = exec_argv('-"/bin/x" "a b" "100%%" --f %d/token "$$HOME"')
    assert argv == ["/bin/x", "a b", "100%", "--f", f"{CREDENTIALS_DIR}/token", "$HOME"]


ORIGINAL_OPTIONS = {
    "enable",
    "package",
    "url",
    "extraArgs",
    "interval",
    "randomizedDelay",
    "switchMode",
    "rebootMode",
    "prometheusFilePath",
}


@pytest.mark.nix
def test_options_are_documented_and_keep_the_original_names(evaluate: Evaluate) -> None:
    (record,) = evaluate(BASE)
    options = {o["name"].removeprefix("system.autoDeploy."): o for o in record["options"]}
    assert ORIGINAL_OPTIONS | {
        "actuator.enable",
        "collectInterval",
        "collector.resident",
        "collector.pollInterval",
    } <= set(options)
    for name, option in options.items():
        assert option["description"].strip(), f"{name} has no description"
        assert option["type"], f"{name} has no type"
    assert options["rebootMode"]["type"] == 'null or one of "reboot", "kexec"'


@pytest.mark.nix
def test_health_option_texts_say_what_is_checked_and_with_which_path(evaluate: Evaluate) -> None:
    """healthChecks.enable names exactly the deploys actuator/transaction.py checks (a
    switch activation, a trial boot) and those it does not; commands names its PATH."""
    (record,) = evaluate(BASE)
    options = {o["name"].removeprefix("system.autoDeploy."): o for o in record["options"]}
    enable = " ".join(options["healthChecks.enable"]["description"].split())
    checked, _, unchecked = enable.partition("Not checked:")
    for mode in SwitchMode:
        assert f"`{mode.value}`" in checked, mode
    assert "trial boot" in checked and "system.autoDeploy.rebootMode" in checked
    assert "without a reboot mode" in unchecked
    assert "a rollback" in unchecked and "hand deploys" in unchecked
    commands = " ".join(options["healthChecks.commands"]["description"].split())
    assert "`PATH` is {option}`system.autoDeploy.healthChecks.path`" in commands
    assert "a unit's `PATH` has no shell" in commands


@pytest.mark.nix
def test_units_and_timers(evaluate: Evaluate) -> None:
    resident, timer = evaluate(BASE, TIMER)
    assert resident["failedAssertions"] == [] and timer["failedAssertions"] == []
    # Resident by default: no timer for the collector.
    assert set(resident["services"]) == {COLLECTOR, ACTUATOR, TRIGGER, BOOT}
    assert set(resident["timers"]) == {ACTUATOR}
    assert set(timer["services"]) == {COLLECTOR, ACTUATOR, TRIGGER, BOOT}
    assert set(timer["timers"]) == {COLLECTOR, ACTUATOR}
    for record in (resident, timer):
        for unit in record["timers"].values():
            assert unit["wantedBy"] == ["timers.target"]
        assert record["package"]["path"] in record["systemPackages"]


@pytest.mark.nix
def test_collector_unit_carries_url_metrics_path_and_secrets(evaluate: Evaluate) -> None:
    (record,) = evaluate(
        BASE
        | {
            "bearerTokenFile": "/run/secrets/token",
            "netrcFile": "/etc/nixos/autodeploy.netrc",
            "extraHeaders": {"X-Host": "web1"},
            "caFile": "/etc/ssl/internal.pem",
            "timeout": 30,
        }
    )
    assert record["failedAssertions"] == []
    service = record["services"][COLLECTOR]
    unit = service["serviceConfig"]
    argv = exec_argv(unit["ExecStart"])
    assert argv[1] == "collect"

    settings = program_settings(argv)
    assert settings.url == BASE["url"]
    assert settings.prometheus_path == BASE["prometheusFilePath"]
    assert settings.timeout == 30
    assert settings.headers == (("X-Host", "web1"),)
    assert settings.ca_file == "/etc/ssl/internal.pem"
    assert settings.bearer_token_file == f"{CREDENTIALS_DIR}/bearer-token"
    assert settings.netrc_file == f"{CREDENTIALS_DIR}/netrc"
    assert unit["LoadCredential"] == [
        "bearer-token:/run/secrets/token",
        "netrc:/etc/nixos/autodeploy.netrc",
    ]
    # The secrets' paths reach the unit only as credentials, never the store.
    config = config_file(argv)
    assert "/run/secrets/token" not in json.dumps(config)
    assert "autodeploy.netrc" not in json.dumps(config)
    assert {"bearer_token_file", "netrc_file"}.isdisjoint(config)
    assert config["timeout"] == 30 and config["headers"] == ["X-Host: web1"]

    assert unit["Type"] == "notify"
    assert unit["StateDirectory"] == "nixos-autodeploy"
    assert "network-online.target" in service["after"]
    assert "network-online.target" in service["wants"]
    assert unit["ProtectSystem"] == "strict"
    assert unit["PrivateTmp"] is True and unit["NoNewPrivileges"] is True
    assert unit["UMask"] == "0022"
    # Sandboxed, but it still must: reach the Nix daemon's socket (NIX_REMOTE=daemon, so
    # the read-only /nix is enough), write the upstream GC root and the deployed mirror in
    # its runtime directory, the state dir, its cache and the metrics file, and fetch over
    # the network. Nothing else under /run: not /run/current-system, /run/wrappers, ...
    assert unit["ReadWritePaths"] == ["/var/lib/node-exporter/text"]
    assert unit["RuntimeDirectory"] == "nixos-autodeploy"
    assert unit["RuntimeDirectoryPreserve"] is True, "the GC root must outlive the run"
    assert settings.paths.runtime_dir == RUNTIME_DIR
    assert settings.paths.upstream == f"{RUNTIME_DIR}/upstream-system"
    assert settings.paths.deployed_link == f"{RUNTIME_DIR}/deployed-system"
    assert service["environment"]["NIX_REMOTE"] == "daemon"
    assert "nix-daemon.socket" in service["after"]
    assert set(unit["RestrictAddressFamilies"]) >= {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert unit["CacheDirectory"] == "nixos-autodeploy"
    assert service["environment"]["XDG_CACHE_HOME"] == "/var/cache/nixos-autodeploy"
    assert "User" not in unit and "DynamicUser" not in unit, "the daemon trusts root"
    assert record["tmpfiles"] == ["d /var/lib/node-exporter/text - - - -", *OWN_LINKS]


KEY_1 = "release-1:" + "A" * 42 + "E="
KEY_2 = "release-2:" + "B" * 42 + "E="


@pytest.mark.nix
def test_trusted_keys_and_host_name_reach_collector_and_actuator(evaluate: Evaluate) -> None:
    signed, default = evaluate(
        BASE | {"trustedKeys": [KEY_1, KEY_2], "signaturesRequired": 2, "hostName": "web1"},
        BASE,
    )
    assert signed["failedAssertions"] == []
    for name in (COLLECTOR, ACTUATOR):
        argv = exec_argv(signed["services"][name]["serviceConfig"]["ExecStart"])
        settings = program_settings(argv)
        assert settings.trusted_keys == (KEY_1, KEY_2)
        assert (settings.signatures_required, settings.host_name) == (2, "web1")
        # Without keys, nothing about signatures; the host name is networking.hostName's.
        argv = exec_argv(default["services"][name]["serviceConfig"]["ExecStart"])
        settings = program_settings(argv)
        assert (settings.trusted_keys, settings.host_name) == ((), "nixos")
        assert "signatures_required" not in config_file(argv)


@pytest.mark.nix
def test_resident_collector_is_a_notify_service_with_a_watchdog(evaluate: Evaluate) -> None:
    default, custom = evaluate(BASE, BASE | {"collector": {"pollInterval": 300}, "timeout": 30})
    for record, every in ((default, 60), (custom, 300)):
        service = record["services"][COLLECTOR]
        unit = service["serviceConfig"]
        argv = exec_argv(unit["ExecStart"])
        assert program_settings(argv).every == every
        assert config_file(argv)["every"] == every
        assert unit["Type"] == "notify"
        assert unit["Restart"] == "always"
        # systemctl reload is SIGHUP: collect now.
        assert re.fullmatch(r"/nix/store/\S+/bin/kill -HUP \$MAINPID", unit["ExecReload"])
        # A poll may wait the interval, fetch until the deadline, then realise a system.
        timeout = program_settings(argv).timeout
        assert int(unit["WatchdogSec"]) >= every + timeout + 600
        assert int(unit["TimeoutStartSec"]) == int(unit["WatchdogSec"])
        assert service["wantedBy"] == ["multi-user.target"]
        # A switch never waits on it: not restarted by switch-to-configuration.
        assert service["restartIfChanged"] is False
        assert COLLECTOR not in record["timers"]


@pytest.mark.nix
def test_timer_collector_when_not_resident(evaluate: Evaluate) -> None:
    (record,) = evaluate(TIMER)
    service = record["services"][COLLECTOR]
    unit = service["serviceConfig"]
    assert unit["Type"] == "oneshot"
    assert program_settings(exec_argv(unit["ExecStart"])).every is None
    assert {"ExecReload", "WatchdogSec", "Restart"}.isdisjoint(unit)
    assert service["wantedBy"] == []
    timer = record["timers"][COLLECTOR]["timerConfig"]
    assert timer["OnCalendar"] == "*:0/5"
    assert timer["Persistent"] is True
    assert "OnBootSec" in timer


@pytest.mark.nix
def test_actuator_unit_carries_modes_and_extra_args(evaluate: Evaluate) -> None:
    (record,) = evaluate(
        BASE
        | {
            "switchMode": "boot",
            "rebootMode": "kexec",
            "maxSnapshotAge": 900,
            "extraArgs": ["--debug", "--dry-run"],
            "interval": "hourly",
            "randomizedDelay": "45min",
            "bearerTokenFile": "/run/secrets/token",
        }
    )
    service = record["services"][ACTUATOR]
    unit = service["serviceConfig"]
    argv = exec_argv(unit["ExecStart"])
    assert argv[1] == "deploy"
    assert argv[-2:] == ["--debug", "--dry-run"]

    settings = program_settings(argv)
    assert settings.switch_mode is SwitchMode.BOOT
    assert settings.reboot_mode is RebootMode.KEXEC
    assert settings.max_snapshot_age == 900
    assert settings.dry_run is True
    assert settings.url == BASE["url"]
    assert settings.prometheus_path == BASE["prometheusFilePath"]
    assert settings.bearer_token_file == f"{CREDENTIALS_DIR}/bearer-token"
    assert unit["LoadCredential"] == ["bearer-token:/run/secrets/token"]

    assert service["restartIfChanged"] is False
    assert service["unitConfig"]["X-StopOnRemoval"] is False
    # exec: a run its timer starts during the boot must not hold the boot up, or its
    # systemd check (`is-system-running --wait`) would wait for its own start job.
    assert unit["Type"] == "exec"
    # Its refreshes write the same links as the collector's runs.
    assert settings.paths.runtime_dir == RUNTIME_DIR
    assert (unit["RuntimeDirectory"], unit["RuntimeDirectoryPreserve"]) == (
        "nixos-autodeploy",
        True,
    )
    assert COLLECTOR + ".service" in service["after"]
    assert COLLECTOR + ".service" in service["wants"]
    # It sets the profile, runs switch-to-configuration through systemd-run (and asks
    # `systemctl is-active`), reboots and kexecs: no sandboxing that would stop any of it.
    sandboxing = {
        "ProtectSystem",
        "NoNewPrivileges",
        "CapabilityBoundingSet",
        "SystemCallFilter",
        "RestrictAddressFamilies",
        "PrivateDevices",
        "PrivateTmp",
        "ProtectKernelModules",
        "ReadWritePaths",
    }
    assert sandboxing.isdisjoint(unit), sandboxing & set(unit)

    timer = record["timers"][ACTUATOR]["timerConfig"]
    assert timer == {
        "OnCalendar": "hourly",
        "RandomizedDelaySec": "45min",
        "FixedRandomDelay": True,
        "Persistent": True,
    }


@pytest.mark.nix
def test_space_settings_reach_both_units_and_the_boot_dir_follows_the_boot_loader(
    evaluate: Evaluate,
) -> None:
    """minFreeStore and bootDir reach the collector and the actuator (the collector reports
    both filesystems), the generation settings the actuator; bootDir is systemd-boot's
    XBOOTLDR or ESP mount point when it is the boot loader, else /boot."""
    space = {"minFreeStore": "2G", "minFreeBoot": "64M", "keepGenerations": 3}
    cases = evaluate(
        BASE | space | {"pruneForeign": True},
        BASE,
        BASE | {"_boot": {"loader": {"systemd-boot": {"enable": True}}}},
        BASE
        | {
            "_boot": {
                "loader": {"systemd-boot": {"enable": True}, "efi": {"efiSysMountPoint": "/efi"}}
            }
        },
        BASE
        | {
            "_boot": {
                "loader": {
                    "systemd-boot": {"enable": True, "xbootldrMountPoint": "/xboot"},
                    "efi": {"efiSysMountPoint": "/efi"},
                }
            }
        },
        BASE | {"_boot": {"loader": {"efi": {"efiSysMountPoint": "/efi"}}}},  # GRUB: /boot
        BASE | {"bootDir": "/mnt/esp", "_boot": {"loader": {"systemd-boot": {"enable": True}}}},
    )

    def settings_of(record: dict[str, Any], unit: str) -> Settings:
        return program_settings(exec_argv(record["services"][unit]["serviceConfig"]["ExecStart"]))

    collector, actuator = (settings_of(cases[0], unit) for unit in (COLLECTOR, ACTUATOR))
    assert collector.min_free_store == actuator.min_free_store == 2 << 30
    assert (actuator.min_free_boot, actuator.keep_generations) == (64 << 20, 3)
    assert actuator.prune_foreign is True
    defaults = settings_of(cases[1], ACTUATOR)
    assert (defaults.min_free_store, defaults.min_free_boot) == (1 << 30, 16 << 20)
    assert (defaults.keep_generations, defaults.prune_foreign) == (10, False)
    boot_dirs = [
        (settings_of(c, COLLECTOR).paths.boot_dir, settings_of(c, ACTUATOR).paths.boot_dir)
        for c in cases[1:]
    ]
    assert boot_dirs == [
        ("/boot", "/boot"),
        ("/boot", "/boot"),
        ("/efi", "/efi"),
        ("/xboot", "/xboot"),
        ("/boot", "/boot"),
        ("/mnt/esp", "/mnt/esp"),
    ]


@pytest.mark.nix
def test_health_checks_reach_the_actuator_and_its_run_at_boot(evaluate: Evaluate) -> None:
    commands = ["curl -f http://127.0.0.1/healthz", "test -e /run/ok"]
    health: dict[str, Any] = {
        "commands": commands,
        "urls": ["http://127.0.0.1:8080/health"],
        "units": ["nginx.service"],
        "ignoreUnits": ["flaky@*"],
        "timeout": 120,
        "path": ["/run/current-system/sw"],
    }
    (record, off) = evaluate(
        BASE | {"healthChecks": health}, BASE | {"healthChecks": {"enable": False}}
    )
    assert record["failedAssertions"] == []
    expected = HealthSettings(
        commands=tuple(commands),
        urls=("http://127.0.0.1:8080/health",),
        units=("nginx.service",),
        ignore_units=("flaky@*",),
        timeout=120.0,
    )
    actuator, boot = record["services"][ACTUATOR], record["services"][BOOT]
    for service in (actuator, boot):
        settings = program_settings(exec_argv(service["serviceConfig"]["ExecStart"]))
        assert settings.health == expected
        assert service["path"] == health["path"]
    assert boot["serviceConfig"]["ExecStart"] == actuator["serviceConfig"]["ExecStart"]
    # Once per boot, after multi-user.target; Type=exec so that the boot is finished
    # while it runs (its systemd check waits for that), never restarted by a switch.
    assert boot["wantedBy"] == ["multi-user.target"]
    assert "multi-user.target" in boot["after"]
    assert boot["serviceConfig"]["Type"] == "exec"
    # Not started again by the next switch (which starts multi-user.target's wants).
    assert boot["serviceConfig"]["RemainAfterExit"] is True
    assert boot["restartIfChanged"] is False
    # Neither ends failed: a failed unit would fail every later hand switch (exit 4).
    for service in (actuator, boot):
        assert service["serviceConfig"]["ExecStart"].startswith('-"/nix/store/')
    assert BOOT not in record["timers"]
    off_settings = program_settings(
        exec_argv(off["services"][ACTUATOR]["serviceConfig"]["ExecStart"])
    )
    assert off_settings.health == HealthSettings(enabled=False)
    (default,) = evaluate(BASE)
    default_settings = program_settings(
        exec_argv(default["services"][ACTUATOR]["serviceConfig"]["ExecStart"])
    )
    assert default_settings.health == HealthSettings()


@pytest.mark.nix
def test_reboot_windows_and_fleet_lock_reach_the_actuator_and_its_timer(
    evaluate: Evaluate,
) -> None:
    autoupgrade_shape = {"lower": "01:00", "upper": "05:00"}
    listed, alone, plain = evaluate(
        BASE
        | {
            "rebootMode": "reboot",
            "rebootWindows": ["Mon..Fri  02:00-04:00", autoupgrade_shape, "22:30-01:00"],
            "fleetLock": {"url": "http://airlock.example.org:3333", "group": "workers"},
        },
        BASE | {"rebootMode": "reboot", "rebootWindows": autoupgrade_shape},
        BASE | {"rebootMode": "reboot"},
    )
    assert listed["failedAssertions"] == alone["failedAssertions"] == []
    settings = program_settings(
        exec_argv(listed["services"][ACTUATOR]["serviceConfig"]["ExecStart"])
    )
    assert settings.reboot_windows == ("Mon..Fri  02:00-04:00", "01:00-05:00", "22:30-01:00")
    assert [w.spec for w in window.parse_all(settings.reboot_windows)] == [
        "Mon..Fri 02:00-04:00",
        "01:00-05:00",
        "22:30-01:00",
    ]
    assert (settings.fleet_lock_url, settings.fleet_lock_group) == (
        "http://airlock.example.org:3333",
        "workers",
    )
    timer = listed["timers"][ACTUATOR]["timerConfig"]
    # The actuator runs at its interval and when each window opens; back from a reboot,
    # soon after boot, to give its reboot slot back.
    assert timer["OnCalendar"] == [
        "04:42",
        "Mon..Fri *-*-* 02:00:00",
        "*-*-* 01:00:00",
        "*-*-* 22:30:00",
    ]
    assert timer["OnBootSec"] == "2min"
    alone_settings = program_settings(
        exec_argv(alone["services"][ACTUATOR]["serviceConfig"]["ExecStart"])
    )
    assert alone_settings.reboot_windows == ("01:00-05:00",)
    assert alone_settings.fleet_lock_url is None
    assert alone["timers"][ACTUATOR]["timerConfig"]["OnCalendar"] == ["04:42", "*-*-* 01:00:00"]
    assert "OnBootSec" not in alone["timers"][ACTUATOR]["timerConfig"]
    assert plain["timers"][ACTUATOR]["timerConfig"]["OnCalendar"] == "04:42"
    assert "reboot_windows" not in config_file(
        exec_argv(plain["services"][ACTUATOR]["serviceConfig"]["ExecStart"])
    )


@pytest.mark.nix
def test_the_halt_reaches_the_actuator_with_its_own_secrets(evaluate: Evaluate) -> None:
    query = "sum(increase(nixos_autodeploy_rollbacks_total[1h])) > 0"
    halted, secret, plain = evaluate(
        BASE
        | {
            "caFile": "/etc/ssl/upstream-ca.pem",
            "rolloutWariness": 0,
            "halt": {"query": query, "prometheusUrl": "https://prometheus.example.org"},
        },
        BASE
        | {
            "bearerTokenFile": "/run/secrets/token",
            "halt": {
                "query": query,
                "prometheusUrl": "https://prometheus.example.org",
                "bearerTokenFile": "/run/secrets/prom-token",
                "netrcFile": "/run/secrets/prom-netrc",
                "caFile": "/etc/ssl/prometheus-ca.pem",
            },
        },
        BASE,
    )
    assert halted["failedAssertions"] == secret["failedAssertions"] == []
    unit = halted["services"][ACTUATOR]["serviceConfig"]
    settings = program_settings(exec_argv(unit["ExecStart"]))
    assert (settings.halt_query, settings.prometheus_url) == (
        query,
        "https://prometheus.example.org",
    )
    assert settings.rollout_wariness == 0.0
    # Without a CA of its own, Prometheus is verified as upstream is.
    assert (settings.prometheus_ca_file, settings.ca_file) == (None, "/etc/ssl/upstream-ca.pem")
    assert settings.prometheus_bearer_token_file is None and "LoadCredential" not in unit
    unit = secret["services"][ACTUATOR]["serviceConfig"]
    argv = exec_argv(unit["ExecStart"])
    settings = program_settings(argv)
    assert settings.prometheus_ca_file == "/etc/ssl/prometheus-ca.pem"
    assert settings.prometheus_bearer_token_file == f"{CREDENTIALS_DIR}/prometheus-bearer-token"
    assert settings.prometheus_netrc_file == f"{CREDENTIALS_DIR}/prometheus-netrc"
    assert settings.bearer_token_file == f"{CREDENTIALS_DIR}/bearer-token"
    assert unit["LoadCredential"] == [
        "bearer-token:/run/secrets/token",
        "prometheus-bearer-token:/run/secrets/prom-token",
        "prometheus-netrc:/run/secrets/prom-netrc",
    ]
    assert "prom-token" not in json.dumps(config_file(argv))
    # Only the actuator asks Prometheus: the collector gets neither its secrets nor query.
    collector = secret["services"][COLLECTOR]["serviceConfig"]
    assert collector["LoadCredential"] == ["bearer-token:/run/secrets/token"]
    assert program_settings(exec_argv(collector["ExecStart"])).halt_query is None
    plain_settings = program_settings(
        exec_argv(plain["services"][ACTUATOR]["serviceConfig"]["ExecStart"])
    )
    assert (plain_settings.halt_query, plain_settings.prometheus_url) == (None, None)
    assert plain_settings.rollout_wariness is None


@pytest.mark.nix
def test_original_defaults(evaluate: Evaluate) -> None:
    (record,) = evaluate({"enable": True, "url": BASE["url"]})
    timer = record["timers"][ACTUATOR]["timerConfig"]
    assert timer["OnCalendar"] == "04:42"
    assert timer["RandomizedDelaySec"] == "0"
    settings = program_settings(
        exec_argv(record["services"][ACTUATOR]["serviceConfig"]["ExecStart"])
    )
    assert settings.switch_mode is SwitchMode.SWITCH
    assert settings.reboot_mode is None
    assert settings.prometheus_path is None
    assert record["tmpfiles"] == OWN_LINKS
    assert "LoadCredential" not in record["services"][COLLECTOR]["serviceConfig"]
    assert "ReadWritePaths" not in record["services"][COLLECTOR]["serviceConfig"]


@pytest.mark.nix
def test_extra_args_are_quoted_for_systemd(evaluate: Evaluate) -> None:
    (record,) = evaluate(BASE | {"extraArgs": ["--header", "X-Odd: 100% $HOME two words"]})
    argv = exec_argv(record["services"][ACTUATOR]["serviceConfig"]["ExecStart"])
    assert argv[-2:] == ["--header", "X-Odd: 100% $HOME two words"]
    assert program_settings(argv).headers == (("X-Odd", "100% $HOME two words"),)


# --- migration from the original tool -----------------------------------------------------


@pytest.mark.nix
@pytest.mark.parametrize(
    ("extra_args", "expected"),
    [
        (["-f"], {"force": True}),
        (["-s", "boot"], {"switch_mode": SwitchMode.BOOT}),
        (["-r", "reboot"], {"reboot_mode": RebootMode.REBOOT}),
        # The original's clap enum spelled kexec "k-exec".
        (["-r", "k-exec"], {"reboot_mode": RebootMode.KEXEC}),
        (["--reboot-mode", "k-exec", "--force"], {"reboot_mode": RebootMode.KEXEC, "force": True}),
        # Its URL argument: like a flag, it wins over the module's config file.
        (["https://ci.example.org/other"], {"url": "https://ci.example.org/other"}),
        (
            ["-f", "-s", "smart", "-r", "kexec"],
            {
                "force": True,
                "switch_mode": SwitchMode.SMART,
                "reboot_mode": RebootMode.KEXEC,
            },
        ),
    ],
)
def test_the_original_tools_extra_args_still_work(
    evaluate: Evaluate, extra_args: list[str], expected: dict[str, Any]
) -> None:
    """An existing `extraArgs = [ "-f" ]` must not make every actuator run exit 2."""
    (record,) = evaluate(BASE | {"extraArgs": extra_args})
    settings = program_settings(
        exec_argv(record["services"][ACTUATOR]["serviceConfig"]["ExecStart"])
    )
    for name, value in expected.items():
        assert getattr(settings, name) == value, name
    if "url" not in expected:
        assert settings.url == BASE["url"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["deploy", "-r", "kexe"], "invalid choice: 'kexe'"),
        (["deploy", "-s", "now"], "invalid choice: 'now'"),
        (["deploy", "http://a/x", "http://b/y"], "unrecognized arguments: http://b/y"),
    ],
)
def test_old_flags_with_bad_values_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_the_url_twice_is_one_clear_error() -> None:
    args = build_parser().parse_args(["deploy", "--url", "http://a/x", "http://b/y"])
    with pytest.raises(ConfigError, match="the URL is given twice"):
        settings_from(args)
    same = build_parser().parse_args(["deploy", "--url", "http://a/x", "http://a/x"])
    assert settings_from(same).url == "http://a/x"


def test_k_exec_is_accepted_in_the_config_file_too(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"url": "http://a/x", "reboot_mode": "k-exec"}))
    args = build_parser().parse_args(["deploy", "--config", str(config)])
    assert settings_from(args).reboot_mode is RebootMode.KEXEC


@pytest.mark.nix
def test_the_generated_config_files_hold_only_options_of_the_table(evaluate: Evaluate) -> None:
    """With every optional setting on, each key of the generated files is one the table lets
    its subcommand take, and the keys are those tests/test_settings.py finds in module.nix's
    text (where CI, without nixpkgs, checks them)."""
    everything = BASE | {
        "extraHeaders": {"X-Host": "web1"},
        "caFile": "/etc/ssl/internal-ca.pem",
        "bearerTokenFile": "/run/secrets/token",
        "netrcFile": "/run/secrets/netrc",
        "rebootMode": "kexec",
        "maxSnapshotAge": 900,
        "rebootWindows": ["02:00-04:00"],
        "fleetLock": {"url": "http://airlock.example.org:3333"},
        "rolloutWariness": 0.5,
        "halt": {
            "query": "vector(0)",
            "prometheusUrl": "http://prometheus.example.org:9090",
            "caFile": "/etc/ssl/prometheus-ca.pem",
        },
        "trustedKeys": [KEY_1],
    }
    full, monitoring = evaluate(everything, everything | {"actuator": {"enable": False}})
    generated = {}
    for command, unit, record in (("deploy", ACTUATOR, full), ("collect", COLLECTOR, monitoring)):
        argv = exec_argv(record["services"][unit]["serviceConfig"]["ExecStart"])
        assert argv[1] == command
        generated[command] = set(config_file(argv))
        taken = {o.name for o in OPTIONS if o.file_type is not None and command in o.commands}
        assert generated[command] <= taken, command
    shown = module_config_keys((REPO / "module.nix").read_text())
    assert generated["deploy"] == shown["upstreamSettings"] | shown["actuatorSettings"]
    assert generated["collect"] == shown["upstreamSettings"] | shown["collectorSettings"]


# --- learning of a switch -------------------------------------------------------------------


@pytest.mark.nix
@pytest.mark.parametrize("actuator", [True, False])
def test_no_activation_script_and_no_restart_of_our_units(
    evaluate: Evaluate, actuator: bool
) -> None:
    """switch-to-configuration waits for every unit it (re)starts and exits 4 when one fails
    (restart lists, changed units); activation scripts do nothing under nixos-init. None of
    ours may be in either path of a switch."""
    (record,) = evaluate(BASE | {"actuator": {"enable": actuator}})
    assert record["activationScripts"] == {}
    assert "activation-restart-list" not in json.dumps(record["services"])
    collector = record["services"][COLLECTOR]
    assert collector["restartIfChanged"] is False
    # A failed collection does not leave the unit failed (switch-to-configuration would
    # list it and exit 4): the "-" prefix.
    assert collector["serviceConfig"]["ExecStart"].startswith('-"/nix/store/')
    for name, service in record["services"].items():
        assert "restartTriggers" not in service and "reloadTriggers" not in service, name


@pytest.mark.nix
@pytest.mark.parametrize("actuator", [True, False])
@pytest.mark.parametrize("settings", [BASE, TIMER], ids=["resident", "timer"])
def test_every_activation_queues_the_collector_without_waiting(
    evaluate: Evaluate, actuator: bool, settings: dict[str, Any]
) -> None:
    """After an activation switch-to-configuration starts the active targets again, which
    starts a wanted oneshot that is inactive again: the trigger. It only queues the
    collector, so the switch waits for the trigger's systemctl call and nothing else.
    (What the resident collector's trigger queues: the test after the next one.)"""
    (record,) = evaluate(settings | {"actuator": {"enable": actuator}})
    trigger = record["services"][TRIGGER]
    assert trigger["wantedBy"] == ["multi-user.target"]
    unit = trigger["serviceConfig"]
    assert unit["Type"] == "oneshot"
    assert "RemainAfterExit" not in unit, "an active trigger would not run again on a switch"
    if settings is TIMER:
        systemctl, *args = exec_argv(unit["ExecStart"])
        assert systemctl == "/nix/store/0000000000000000000000000000000a-systemd/bin/systemctl"
        assert args == ["start", "--no-block", f"{COLLECTOR}.service"]
    # Nothing orders the trigger after the collector, nor pulls the collector into the
    # transaction of the switch.
    for key in ("after", "wants", "requires", "bindsTo"):
        assert f"{COLLECTOR}.service" not in trigger.get(key, []), key


# systemctl in the sandbox: `start --no-block UNIT` queues UNIT's job and returns, as systemd
# does; the job (UNITS/UNIT holds its command) runs in the background, its output in
# JOBS/UNIT.log, its exit status written to the inherited descriptor STATUS when it ends.
FAKE_SYSTEMCTL = """#!/bin/sh
if [ "$#" -ne 3 ] || [ "$1 $2" != "start --no-block" ]; then
    echo "systemctl (sandbox): unexpected call: $*" >&2
    exit 64
fi
command=$(cat '{units}'/"$3") || exit 5
(
    sh -c "$command" > '{jobs}'/"$3.log" 2>&1
    echo $? > /dev/fd/{status}
) < /dev/null > /dev/null 2>&1 &
"""

# What switch-to-configuration does around our units: activate (point current at the new
# system), then start the active targets, which runs the trigger, waiting for its job.
SWITCH_LIKE = """#!/bin/sh
set -e
ln -sfn '{system}' '{root}/run/current-system'
{trigger}
echo switched
"""


@pytest.mark.nix
def test_a_failing_collector_cannot_fail_or_hold_up_a_switch(
    evaluate: Evaluate, tmp_path: Path, test_server: TestServer
) -> None:
    """The trigger the module installs, run as a switch runs it, in a sandbox whose collector
    (the module's own command line and config file) hangs on upstream and then fails: the
    switch-like run exits 0 while the collector still waits, and the collector's failure
    reaches nobody but its own log."""
    released = threading.Event()

    def gated(request: RecordedRequest) -> Reply:
        released.wait()  # the collector hangs here until the switch-like run is over
        return Reply(status=404, body=b"not published yet\n")

    test_server.route("/upstream", gated)
    (record,) = evaluate(TIMER | {"url": test_server.url("/upstream")})
    root, units, jobs, bin_dir = (tmp_path / n for n in ("root", "units", "jobs", "bin"))
    for directory in (root / "run", units, jobs, bin_dir):
        directory.mkdir(parents=True)

    collector = record["services"][COLLECTOR]["serviceConfig"]["ExecStart"]
    assert collector.startswith("-"), "a failure would leave the unit failed"
    program, *args = exec_argv(collector)
    assert program.endswith("/bin/nixos-autodeploy") and args[0] == "collect"
    sandbox = ["--root", str(root), "--state-dir", str(tmp_path / "state")]
    sandbox += ["--runtime-dir", str(tmp_path / "runtime")]
    agent = [sys.executable, "-m", "collector.cli", *args, *sandbox]
    (units / f"{COLLECTOR}.service").write_text(
        f"cd {shlex.quote(str(REPO))} && {shlex.join(agent)}"
    )
    # The job's status comes through a pipe: its end of file says the job has ended.
    status_read, status_write = os.pipe()
    systemctl = bin_dir / "systemctl"
    systemctl.write_text(FAKE_SYSTEMCTL.format(units=units, jobs=jobs, status=status_write))
    systemctl.chmod(0o755)

    real_systemctl, *trigger_args = exec_argv(
        record["services"][TRIGGER]["serviceConfig"]["ExecStart"]
    )
    assert real_systemctl.endswith("/bin/systemctl")
    switch = tmp_path / "switch-like"
    trigger = shlex.join([str(systemctl), *trigger_args])
    switch.write_text(
        SWITCH_LIKE.format(system="/nix/store/new-system", root=root, trigger=trigger)
    )
    switch.chmod(0o755)
    try:
        result = subprocess.run(
            [str(switch)], capture_output=True, text=True, pass_fds=(status_write,), timeout=120
        )
    finally:
        os.close(status_write)
        released.set()
    with os.fdopen(status_read) as statuses:
        assert (result.returncode, result.stdout) == (0, "switched\n"), result.stderr
        assert (root / "run/current-system").readlink() == Path("/nix/store/new-system")
        status = statuses.read().strip()  # end of file: the queued collector has ended

    log = (jobs / f"{COLLECTOR}.service.log").read_text()
    assert status == "1", log  # it failed: the "-" prefix keeps its unit from "failed"
    assert "error: upstream" in log and "HTTP 404" in log, log
    assert test_server.count("/upstream") == 1, "the collector did run, after the switch"


@pytest.mark.nix
def test_collector_writes_its_links_in_its_runtime_directory(host: Host, tmp_path: Path) -> None:
    """With the module's --runtime-dir the collector writes the upstream GC root and the
    deployed mirror there, and nothing under /run; /run/upstream-system and
    /run/deployed-system (tmpfiles "L+" links, made here the same way) lead to them."""
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    runtime = tmp_path / "run-nixos-autodeploy"
    runtime.mkdir()
    for name in ("upstream-system", "deployed-system"):
        (host.root / "run" / name).symlink_to(runtime / name)
    before = sorted(p.name for p in (host.root / "run").iterdir())

    result = host.collect("--runtime-dir", str(runtime), "--track")

    assert result.returncode == 0, result
    assert (runtime / "upstream-system").readlink() == Path(system.path)
    assert (runtime / "deployed-system").readlink() == Path(system.path)
    for name in ("upstream-system", "deployed-system"):  # the old places lead there
        assert (host.root / "run" / name).resolve() == Path(system.path), name
    assert sorted(p.name for p in (host.root / "run").iterdir()) == before
    for name in ("upstream-system", "deployed-system"):
        assert (host.root / "run" / name).readlink() == runtime / name, "link replaced"
    # A real GC root: Nix keeps upstream alive through the runtime directory.
    roots = run_checked(["nix-store", "--gc", "--print-roots"], env=host.nix_env())
    assert f"{runtime}/upstream-system -> {system.path}" in roots, roots


@pytest.mark.nix
def test_monitoring_only_host_has_only_the_collector(evaluate: Evaluate) -> None:
    (record,) = evaluate(TIMER | {"actuator": {"enable": False}})
    assert record["failedAssertions"] == []
    assert set(record["services"]) == {COLLECTOR, TRIGGER}
    assert set(record["timers"]) == {COLLECTOR}
    assert record["tmpfiles"][1:] == OWN_LINKS
    # Nothing else records what runs: the collector tracks.
    argv = exec_argv(record["services"][COLLECTOR]["serviceConfig"]["ExecStart"])
    assert program_settings(argv).track is True
    (with_actuator,) = evaluate(BASE)
    argv = exec_argv(with_actuator["services"][COLLECTOR]["serviceConfig"]["ExecStart"])
    assert program_settings(argv).track is False


@pytest.mark.nix
def test_disabled_module_configures_nothing(evaluate: Evaluate) -> None:
    for disabled in evaluate({"url": BASE["url"]}, {}):
        assert disabled["services"] == {} and disabled["timers"] == {}
        assert disabled["activationScripts"] == {} and disabled["systemPackages"] == []
        assert disabled["failedAssertions"] == []


@pytest.mark.nix
def test_every_option_combination_evaluates(evaluate: Evaluate) -> None:
    combinations = list(
        itertools.product(
            ["switch", "boot", "smart"],
            [None, "reboot", "kexec"],
            [True, False],
            [None, "/run/metrics/nixos-autodeploy.prom"],
        )
    )
    cases = [
        {
            "enable": True,
            "url": BASE["url"],
            "switchMode": switch_mode,
            "rebootMode": reboot_mode,
            "actuator": {"enable": actuator},
            "prometheusFilePath": metrics,
        }
        for switch_mode, reboot_mode, actuator, metrics in combinations
    ]
    records = evaluate(*cases)
    assert len(records) == len(combinations) == 36
    for (switch_mode, reboot_mode, actuator, metrics), record in zip(
        combinations, records, strict=True
    ):
        case = f"{switch_mode=} {reboot_mode=} {actuator=} {metrics=}"
        failed = record["failedAssertions"]
        if reboot_mode is not None and not actuator:
            assert len(failed) == 1 and failed[0].startswith(REBOOT_WITHOUT_ACTUATOR), case
        else:
            assert failed == [], case
        collector = program_settings(
            exec_argv(record["services"][COLLECTOR]["serviceConfig"]["ExecStart"])
        )
        assert collector.prometheus_path == metrics, case
        if actuator:
            unit = record["services"][ACTUATOR]["serviceConfig"]
            settings = program_settings(exec_argv(unit["ExecStart"]))
            assert settings.switch_mode == SwitchMode(switch_mode), case
            expected_reboot = None if reboot_mode is None else RebootMode(reboot_mode)
            assert settings.reboot_mode == expected_reboot, case
        else:
            assert ACTUATOR not in record["services"], case


@pytest.mark.nix
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"url": ""}, "system.autoDeploy.url must be the URL"),
        ({"url": "ci.example.org/x"}, "system.autoDeploy.url must be the URL"),
        ({"bearerTokenFile": "/nix/store/abc-token"}, "system.autoDeploy.bearerTokenFile must be"),
        ({"netrcFile": "relative/netrc"}, "system.autoDeploy.netrcFile must be"),
        ({"prometheusFilePath": "metrics.prom"}, "system.autoDeploy.prometheusFilePath must be"),
        (
            {"actuator": {"enable": False}, "extraArgs": ["--force"]},
            "system.autoDeploy.extraArgs are passed to the actuator",
        ),
        ({"extraHeaders": {"X Host": "web1"}}, "system.autoDeploy.extraHeaders must map"),
        ({"extraHeaders": {"X-Host": "a\r\nX-Evil: 1"}}, "system.autoDeploy.extraHeaders must"),
        (
            {"healthChecks": {"urls": ["127.0.0.1/health"]}},
            "system.autoDeploy.healthChecks.urls must be http:// or https:// URLs",
        ),
        ({"rebootWindows": ["2-4"]}, 'system.autoDeploy.rebootWindows must be "[DAYS ]HH:MM'),
        (
            {"fleetLock": {"url": "airlock.example.org:3333"}},
            "system.autoDeploy.fleetLock.url must be the http:// or https:// URL",
        ),
        (
            {"halt": {"query": "vector(0)", "prometheusUrl": "prometheus:9090"}},
            "system.autoDeploy.halt.prometheusUrl must be the http:// or https:// URL",
        ),
        (
            {"halt": {"query": "up", "prometheusUrl": "http://p", "netrcFile": "/nix/store/n"}},
            "system.autoDeploy.halt.netrcFile must be",
        ),
        (
            {"actuator": {"enable": False}, "halt": {"query": "up", "prometheusUrl": "http://p"}},
            "system.autoDeploy.halt holds back the actuator's deploys",
        ),
        (
            {"actuator": {"enable": False}, "rebootWindows": ["02:00-04:00"]},
            "system.autoDeploy.rebootWindows and fleetLock govern the actuator's reboots",
        ),
        ({"trustedKeys": ["release-1"]}, "system.autoDeploy.trustedKeys must be Nix public keys"),
        (
            {"trustedKeys": [KEY_1], "signaturesRequired": 2},
            "system.autoDeploy.signaturesRequired (2) is more than the 1 trustedKeys",
        ),
    ],
)
def test_assertions_explain_what_is_wrong(
    evaluate: Evaluate, settings: dict[str, Any], message: str
) -> None:
    (record,) = evaluate(BASE | settings)
    assert len(record["failedAssertions"]) == 1, record["failedAssertions"]
    assert record["failedAssertions"][0].startswith(message)


@pytest.mark.nix
@pytest.mark.parametrize(
    ("settings", "option"),
    [
        ({"switchMode": "now"}, "system.autoDeploy.switchMode"),
        ({"rebootMode": "poweroff"}, "system.autoDeploy.rebootMode"),
        ({"timeout": 0}, "system.autoDeploy.timeout"),
        ({"fleetLock": {"url": "http://a", "group": "a b"}}, "system.autoDeploy.fleetLock.group"),
        ({"rebootWindows": [{"lower": "1:00", "upper": "05:00"}]}, "rebootWindows"),
        ({"collector": {"pollInterval": 0}}, "system.autoDeploy.collector.pollInterval"),
        ({"halt": {"query": " ", "prometheusUrl": "http://p"}}, "system.autoDeploy.halt.query"),
        ({"rolloutWariness": 1.5}, "system.autoDeploy.rolloutWariness"),
        ({"healthChecks": {"timeout": 0}}, "system.autoDeploy.healthChecks.timeout"),
        ({"trustedKeys": [KEY_1], "signaturesRequired": 0}, "system.autoDeploy.signaturesRequired"),
    ],
)
def test_invalid_values_are_rejected(
    nixpkgs_lib: str, settings: dict[str, Any], option: str
) -> None:
    result = nix_eval(nixpkgs_lib, EVAL_MODULE, casesJson=json.dumps([BASE | settings]))
    assert result.returncode != 0
    assert option in result.stderr


@pytest.mark.nix
def test_package_wraps_tools_and_matches_pyproject(evaluate: Evaluate) -> None:
    (record,) = evaluate(BASE)
    package = record["package"]
    assert package["mainProgram"] == "nixos-autodeploy"
    assert record["services"][ACTUATOR]["serviceConfig"]["ExecStart"].startswith(
        f'-"{package["path"]}/bin/nixos-autodeploy" '
    )
    wrapper = package["makeWrapperArgs"]
    assert wrapper[:3] == ["--prefix", "PATH", ":"]
    on_path = [entry.split("-", 1)[1] for entry in wrapper[3].split(":")]
    # The module hands in the system's own nix and systemd.
    assert on_path == ["nix/bin", "systemd/bin", "kexec-tools/bin"]
    assert {normalize(name) for name in package["dependencies"]} == pyproject_dependencies()
    # Whatever pytestCheckHook the nixpkgs release has, pytest reads PYTEST_ADDOPTS.
    assert left_out_marks(pytest_addopts(package["preCheck"])) == declared_marks()
    assert "disabledTestMarks" not in package["attributes"], "missing from older nixpkgs"

    # Health check commands run with the closure's shell: a unit's PATH has no `sh`.
    replaced = re.search(r"--replace '([^']+)' '([^']+)'", package["postPatch"])
    assert replaced is not None, package["postPatch"]
    assert "actuator/health.py" in package["postPatch"]
    assert replaced[1] in (REPO / "actuator" / "health.py").read_text().splitlines()
    assert replaced[2] == 'SHELL = "/nix/store/0000000000000000000000000000000a-bash/bin/bash"'


@pytest.mark.nix
def test_flake_outputs(nixpkgs_lib: str) -> None:
    result = nix_eval(nixpkgs_lib, EVAL_FLAKE)
    assert result.returncode == 0, result.stderr
    flake = json.loads(result.stdout)
    assert flake["inputs"] == ["nixpkgs"]
    for output in ("nixosModules", "packages", "overlays", "devShells", "formatter", "checks"):
        assert output in flake["outputs"]
    assert flake["modules"] == {"default": True, "nixos-autodeploy": True}
    for system in ("x86_64-linux", "aarch64-linux"):
        assert flake["systems"][system] == {
            "packages": ["default", "nixos-autodeploy"],
            "checks": ["lint", "package", "vm"],
            "devShells": ["default"],
        }
    assert flake["formatterSystems"] == ["aarch64-linux", "x86_64-linux"]
    assert flake["overlayPackage"] == "nixos-autodeploy"


# systemctl for the resident collector's trigger: records its calls, answers `show` with
# the collector's main PID.
RECORDING_SYSTEMCTL = """#!/bin/sh
echo "$@" >> '{log}'
if [ "$1" = show ]; then echo '{pid}'; fi
"""


@pytest.mark.nix
@pytest.mark.parametrize(
    ("running", "expected"),
    [
        ("current", f"reload --no-block {COLLECTOR}.service"),
        ("older-config", f"try-restart --no-block {COLLECTOR}.service"),
        ("older-program", f"try-restart --no-block {COLLECTOR}.service"),
        (None, f"start --no-block {COLLECTOR}.service"),
    ],
)
def test_resident_trigger_reloads_restarts_or_starts_the_collector_without_waiting(
    evaluate: Evaluate, tmp_path: Path, running: str | None, expected: str
) -> None:
    """The resident collector's trigger, run for real against a process with the collector's
    command line (or none) and a recording systemctl: a reload (SIGHUP: collect now) when
    it runs the current program and config, else a restart; a start when it does not run.
    Each only queues a job (--no-block)."""
    (record,) = evaluate(BASE)
    argv = exec_argv(record["services"][COLLECTOR]["serviceConfig"]["ExecStart"])
    exec_start = record["services"][TRIGGER]["serviceConfig"]["ExecStart"]
    assert exec_start.startswith("-"), "a reload of a collector that just ended must not fail"
    script = Path(exec_start[1:]).read_text()
    systemctl = re.search(r"/nix/store/\S+-systemd/bin/systemctl", script)
    grep = re.search(r"/nix/store/\S+/bin/grep", script)
    assert systemctl and grep, script
    if running == "older-config":
        argv[argv.index("--config") + 1] = "/nix/store/00000000000000000000000000000000-old.json"
    elif running == "older-program":
        argv[0] = "/nix/store/00000000000000000000000000000000-old/bin/nixos-autodeploy"
    # A process whose command line is the collector's (the program's path, its arguments).
    collector = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", *argv], stdin=subprocess.PIPE
    )
    try:
        log = tmp_path / "systemctl.log"
        fake = tmp_path / "systemctl"
        fake.write_text(RECORDING_SYSTEMCTL.format(log=log, pid=collector.pid if running else 0))
        fake.chmod(0o755)
        runnable = script.replace(systemctl.group(0), str(fake))
        runnable = runnable.replace(grep.group(0), require_tool("grep"))
        subprocess.run(["sh", "-c", runnable], check=True, timeout=30)
    finally:
        collector.communicate(b"")
    calls = log.read_text().splitlines()
    assert calls == [f"show --property MainPID --value {COLLECTOR}.service", expected]
