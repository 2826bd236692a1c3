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
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import require_tool

from actuator import window
from collector.cli import build_parser
from collector.config import RebootMode, Settings, SwitchMode, settings_from

REPO = Path(__file__).resolve().parent.parent
EVAL_MODULE = REPO / "tests" / "nix" / "eval-module.nix"
EVAL_FLAKE = REPO / "tests" / "nix" / "eval-flake.nix"
SKIP_DIRS = {".git", ".venv", ".cache", "node_modules", "result"}

COLLECTOR = "nixos-autodeploy-collector"
ACTUATOR = "nixos-autodeploy"
# What systemd substitutes for %d (the unit's credentials directory).
CREDENTIALS_DIR = "/run/credentials/unit.service"

BASE: dict[str, Any] = {
    "enable": True,
    "url": "https://ci.example.org/hosts/web1/system",
    "prometheusFilePath": "/var/lib/node-exporter/text/nixos-autodeploy.prom",
}

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
    pytestCheckHook selects (all but disabledTestMarks), on a copy of exactly the files its
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
    marks = package_nix_list("disabledTestMarks")
    assert marks, "package.nix disables no test marks"
    env = {"PATH": str(bin_dir), "HOME": "/homeless-shelter", "TMPDIR": str(tmp_path)}
    env |= {"LANG": "C.UTF-8", "NIX_STORE_DIR": os.environ.get("NIX_STORE_DIR", "/nix/store")}
    itself = "tests/test_nix_files.py::test_package_check_phase_passes_without_nix_tools"
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs"]
    argv += ["-m", " and ".join(f"not ({mark})" for mark in marks), "--deselect", itself]
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
    """Split an ExecStart= line the way systemd does and expand the specifiers it uses."""

    def expand(word: str) -> str:
        def specifier(match: re.Match[str]) -> str:
            known = {"%": "%", "d": CREDENTIALS_DIR}
            assert match.group(1) in known, f"unexpected specifier in {word!r}"
            return known[match.group(1)]

        return re.sub(r"%(.)", specifier, word).replace("$$", "$")

    return [expand(word) for word in shlex.split(exec_start)]


def program_settings(argv: list[str]) -> Settings:
    """What the program makes of the unit's command line (argv[0] is the program)."""
    assert argv[0].endswith("/bin/nixos-autodeploy"), argv
    return settings_from(build_parser().parse_args(argv[1:]))


def config_file(argv: list[str]) -> dict[str, Any]:
    path = argv[argv.index("--config") + 1]
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def test_exec_argv_follows_systemd_quoting() -> None:
    argv = exec_argv('"/bin/x" "a b" "100%%" --f %d/token "$$HOME"')
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
    assert ORIGINAL_OPTIONS | {"actuator.enable", "collectInterval"} <= set(options)
    for name, option in options.items():
        assert option["description"].strip(), f"{name} has no description"
        assert option["type"], f"{name} has no type"
    assert options["rebootMode"]["type"] == 'null or one of "reboot", "kexec"'


@pytest.mark.nix
def test_units_and_timers(evaluate: Evaluate) -> None:
    (record,) = evaluate(BASE)
    assert record["failedAssertions"] == []
    assert set(record["services"]) == {COLLECTOR, ACTUATOR}
    assert set(record["timers"]) == {COLLECTOR, ACTUATOR}
    for timer in record["timers"].values():
        assert timer["wantedBy"] == ["timers.target"]
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

    assert unit["Type"] == "oneshot"
    assert unit["StateDirectory"] == "nixos-autodeploy"
    assert "network-online.target" in service["after"]
    assert "network-online.target" in service["wants"]
    assert unit["ProtectSystem"] == "strict"
    assert unit["PrivateTmp"] is True and unit["NoNewPrivileges"] is True
    assert unit["UMask"] == "0022"
    # Sandboxed, but it still must: reach the Nix daemon's socket (NIX_REMOTE=daemon, so
    # the read-only /nix is enough), create /run/upstream-system and /run/deployed-system,
    # write the state dir, its cache and the metrics file, and fetch over the network.
    assert set(unit["ReadWritePaths"]) == {"/run", "/var/lib/node-exporter/text"}
    assert service["environment"]["NIX_REMOTE"] == "daemon"
    assert "nix-daemon.socket" in service["after"]
    assert set(unit["RestrictAddressFamilies"]) >= {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert unit["CacheDirectory"] == "nixos-autodeploy"
    assert service["environment"]["XDG_CACHE_HOME"] == "/var/cache/nixos-autodeploy"
    assert "User" not in unit and "DynamicUser" not in unit, "the daemon trusts root"
    assert record["tmpfiles"] == ["d /var/lib/node-exporter/text - - - -"]

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
    assert unit["Type"] == "oneshot"
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
    assert record["tmpfiles"] == []
    assert "LoadCredential" not in record["services"][COLLECTOR]["serviceConfig"]


@pytest.mark.nix
def test_extra_args_are_quoted_for_systemd(evaluate: Evaluate) -> None:
    (record,) = evaluate(BASE | {"extraArgs": ["--header", "X-Odd: 100% $HOME two words"]})
    argv = exec_argv(record["services"][ACTUATOR]["serviceConfig"]["ExecStart"])
    assert argv[-2:] == ["--header", "X-Odd: 100% $HOME two words"]
    assert program_settings(argv).headers == (("X-Odd", "100% $HOME two words"),)


@pytest.mark.nix
@pytest.mark.parametrize("existing", [None, "other.service\n"])
def test_activation_hook_appends_to_restart_list(
    evaluate: Evaluate, tmp_path: Path, existing: str | None
) -> None:
    (record,) = evaluate(BASE)
    script = record["activationScripts"]["nixos-autodeploy"]
    assert "/run/nixos/activation-restart-list" in script
    run_dir = tmp_path / "run-nixos"
    run_dir.mkdir()
    restart_list = run_dir / "activation-restart-list"
    if existing is not None:
        restart_list.write_text(existing)
    # Run the hook for real, twice, against a stand-in for /run/nixos.
    runnable = script.replace("/run/nixos", str(run_dir))
    for _ in range(2):
        subprocess.run(["bash", "-euc", runnable], check=True, timeout=30)
    lines = restart_list.read_text().splitlines()
    kept = [] if existing is None else ["other.service"]
    assert lines == [*kept, f"{COLLECTOR}.service", f"{COLLECTOR}.service"]


@pytest.mark.nix
def test_activation_hook_without_run_nixos_does_nothing(evaluate: Evaluate, tmp_path: Path) -> None:
    (record,) = evaluate(BASE)
    missing = tmp_path / "absent"
    runnable = record["activationScripts"]["nixos-autodeploy"].replace("/run/nixos", str(missing))
    subprocess.run(["bash", "-euc", runnable], check=True, timeout=30)
    assert not missing.exists()


@pytest.mark.nix
def test_monitoring_only_host_has_only_the_collector(evaluate: Evaluate) -> None:
    (record,) = evaluate(BASE | {"actuator": {"enable": False}})
    assert record["failedAssertions"] == []
    assert set(record["services"]) == {COLLECTOR}
    assert set(record["timers"]) == {COLLECTOR}
    assert "nixos-autodeploy" in record["activationScripts"]
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
        ({"rebootWindows": ["2-4"]}, 'system.autoDeploy.rebootWindows must be "[DAYS ]HH:MM'),
        (
            {"fleetLock": {"url": "airlock.example.org:3333"}},
            "system.autoDeploy.fleetLock.url must be the http:// or https:// URL",
        ),
        (
            {"actuator": {"enable": False}, "rebootWindows": ["02:00-04:00"]},
            "system.autoDeploy.rebootWindows and fleetLock govern the actuator's reboots",
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
    assert record["services"][COLLECTOR]["serviceConfig"]["ExecStart"].startswith(
        f'"{package["path"]}/bin/nixos-autodeploy" '
    )
    wrapper = package["makeWrapperArgs"]
    assert wrapper[:3] == ["--prefix", "PATH", ":"]
    on_path = [entry.split("-", 1)[1] for entry in wrapper[3].split(":")]
    # The module hands in the system's own nix and systemd.
    assert on_path == ["nix/bin", "systemd/bin", "kexec-tools/bin"]
    assert {normalize(name) for name in package["dependencies"]} == pyproject_dependencies()
    with open(REPO / "pyproject.toml", "rb") as f:
        markers = tomllib.load(f)["tool"]["pytest"]["ini_options"]["markers"]
    declared = {marker.split(":")[0] for marker in markers}
    assert set(package["disabledTestMarks"]) == declared


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
