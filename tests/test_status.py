"""What operators read: `status` (as JSON and as a table: the links, what upstream would
change, what a hand deploy changed, the last deploy, health checks and rollback), `diff`
and `log`, against real Nix, real closures and the real actuator."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from harness import (
    AgentResult,
    Host,
    Package,
    System,
    SystemSpec,
    error_lines,
    metric,
    no_traceback,
)
from harness.closures import EXPECTED, expected_counts, expected_json_changes, versioned_update
from harness.deploys import deploy

pytestmark = pytest.mark.nix

WIDE = {"COLUMNS": "250"}


# ---- status -------------------------------------------------------------------------


def table_row(table: AgentResult, label: str) -> str:
    """The line of the status table whose first cell is `label`."""
    rows = [
        line
        for line in table.stdout.splitlines()
        if line.startswith("│") and line.strip("│ ").startswith(label)
    ]
    assert len(rows) == 1, table
    return rows[0]


def status_table(host: Host) -> AgentResult:
    # Captured stdout is not a terminal: no colour codes. Wide enough for full paths.
    table = host.run_agent("status", env={"COLUMNS": "250"})
    assert table.returncode == 0, table
    assert "\x1b[" not in table.stdout, "colour codes on a stdout that is not a terminal"
    return table


def test_status_json_and_table(host: Host) -> None:
    old, new = host.update_published()
    result = host.status("--json")
    assert result.returncode == 0, result
    shown = json.loads(result.stdout)
    expected = {
        "state": "update-available",
        "dirty": False,
        "reboot_required": False,
        "current": old.path,
        "booted": old.path,
        "profile": old.path,
        "deployed": old.path,
        "upstream": new.path,
        "upstream_error": None,
        "last_deploy": None,
    }
    assert {k: shown[k] for k in expected} == expected
    assert shown["collected_at"] == host.snapshot()["collected_at"]
    table = host.run_agent("status", env={"COLUMNS": "250"})
    assert table.returncode == 0, table
    assert "update-available" in table.stdout
    assert old.path in table.stdout and new.path in table.stdout


def test_status_table_marks_what_differs_from_current(host: Host) -> None:
    old, new = host.update_published()
    table = status_table(host)
    for label in ("current", "booted", "profile", "deployed"):
        row = table_row(table, label)
        assert old.path in row and "≠ current" not in row, table
    row = table_row(table, "upstream")
    assert new.path in row and "≠ current" in row, table
    assert "dirty: no" in table.stdout and "reboot required: no" in table.stdout, table
    assert "upstream error" not in table.stdout, table


def test_status_table_shows_dirty_and_reboot_required(host: Host) -> None:
    systems = host.build(SystemSpec("ours"), SystemSpec("theirs", kernel="6.9.1"), SystemSpec("ci"))
    ours, theirs, ci = systems["ours"], systems["theirs"], systems["ci"]
    host.install(ours)
    host.write_deployed(ours)
    host.deploy_by_hand(theirs, "switch")  # a new kernel, switched to by hand
    host.publish(ci)
    assert host.collect().returncode == 0
    assert (host.snapshot()["state"], host.snapshot()["reboot_required"]) == ("dirty", True)
    table = status_table(host)
    marked = {
        "current": (theirs, False),
        "booted": (ours, True),
        "profile": (theirs, False),
        "deployed": (ours, True),
        "upstream": (ci, True),
    }
    for label, (system, differs) in marked.items():
        row = table_row(table, label)
        assert system.path in row, table
        assert ("≠ current" in row) is differs, table
    assert "dirty: yes" in table.stdout, table
    assert "reboot required: yes" in table.stdout, table


def test_status_table_folds_a_long_store_path_after_its_hash(host: Host) -> None:
    system = host.build_one("with-a-rather-long-name-that-does-not-fit-narrow-terminals")
    host.install(system)
    host.publish(system)
    assert host.collect().returncode == 0
    table = host.run_agent("status", env={"COLUMNS": "72"})
    assert table.returncode == 0, table
    head = system.path[: system.path.index("-") + 1]  # the store directory and the hash
    # Each system's row (deployed: none, the host is untracked) holds its whole hash.
    labels = [line.split("│")[1].strip() for line in table.stdout.splitlines() if head in line]
    assert labels == ["current", "booted", "profile", "upstream"], table
    assert system.path not in table.stdout, "too narrow for the whole path on one line"


def test_status_table_shows_the_upstream_error(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.write_deployed(system)
    host.publish(system)
    assert host.collect().returncode == 0
    host.server.publish_body(b"<html>maintenance</html>\n")
    failed = host.collect()
    assert failed.returncode == 1, failed
    table = status_table(host)
    (line,) = [line for line in table.stdout.splitlines() if "upstream error" in line]
    assert "HTML" in line and host.url in line, table
    assert host.snapshot()["upstream"]["error"] in " ".join(table.stdout.split()), table


def test_status_shows_the_upstream_error(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.server.publish_body(b"")
    assert host.collect().returncode == 1
    shown = json.loads(host.status("--json").stdout)
    assert "empty body" in shown["upstream_error"]
    assert shown["state"] == "unknown"


def test_status_without_snapshot_says_run_collect(host: Host) -> None:
    result = host.status()
    assert result.returncode == 1
    assert len(result.stderr_lines) == 1 and "collect" in result.stderr_lines[0]


@pytest.mark.parametrize("rolled_back", [True, False])
def test_status_and_metrics_show_the_last_health_checks_and_rollback(
    host: Host, rolled_back: bool
) -> None:
    """What the actuator records after failed health checks (docs/CONTRACT.md, deploys.json)
    reaches the metrics, `status` and `status --json`."""
    old, new = host.update_published()
    reason = "check 'http://127.0.0.1/health' failed: HTTP 503 Service Unavailable"
    health = {
        "at": 1_800_000_000.0,
        "ok": False,
        "attempts": 60,
        "summary": reason,
        "checks": [{"name": "http://127.0.0.1/health", "ok": False, "output": ["HTTP 503"]}],
    }
    rollback = {
        "at": 1_800_000_010.0,
        "from": new.path,
        "to": old.path,
        "ok": rolled_back,
        "reason": reason,
    }
    deploys = {
        "version": 1,
        "last": None,
        "totals": {"success": 0, "failure": 1},
        "failed_path": new.path,
        "health": health,
        "rollbacks": 2,
        "last_rollback": rollback,
    }
    (host.state_dir / "deploys.json").write_text(json.dumps(deploys))
    assert host.collect().returncode == 0
    metrics = host.metrics()
    assert metric(metrics, "nixos_autodeploy_last_health_check_success") == 0
    assert metric(metrics, "nixos_autodeploy_last_health_check_timestamp_seconds") == health["at"]
    assert metric(metrics, "nixos_autodeploy_rollbacks_total") == 2
    assert metric(metrics, "nixos_autodeploy_last_rollback_success") == rolled_back
    shown = json.loads(host.status("--json").stdout)
    assert (shown["last_health"], shown["last_rollback"]) == (health, rollback)
    lines = status_table(host).stdout.splitlines()
    assert any(x.startswith("last health check: failed") and x.endswith(reason) for x in lines)
    (line,) = (x for x in lines if f"rolled back from {new.path} at 2027-01-15 08:00:10 UTC" in x)
    assert line.startswith("rolled back" if rolled_back else "rolling back failed ("), line
    assert line.endswith(f"ago): {reason}" if rolled_back else f"ago)): {reason}"), line


def test_status_summarises_what_upstream_changes(host: Host) -> None:
    versioned_update(host)
    result = host.run_agent("status", env=WIDE)
    assert result.returncode == 0, result
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("upstream changes")]
    assert re.fullmatch(
        r"upstream changes 16 packages \(8 upgraded, 1 downgraded, 3 added, 2 removed,"
        r" 2 rebuilt\), closure [+-]\d+(\.\d)? (B|KiB|MiB);"
        r" kernel 6\.6\.41 → 6\.6\.44: reboot needed",
        line,
    ), line
    shown = json.loads(host.status("--json").stdout)
    assert shown["changes"]["counts"] == expected_counts()
    assert shown["changes"]["changes"] == expected_json_changes()
    assert shown["hand_changes"] is None


def test_status_on_a_dirty_host_says_what_the_hand_deploy_changed(host: Host) -> None:
    base = (Package("nginx", "1.26.1"), Package("openssl", "3.0.13"), Package("vim", "9.0"))
    systems = host.build(
        SystemSpec("ours", packages=base),
        SystemSpec("theirs", packages=(Package("nginx", "1.27.0"), *base[1:2])),
        SystemSpec("ci", packages=base, extra="published"),
    )
    host.install(systems["ours"])
    host.write_deployed(systems["ours"])
    host.deploy_by_hand(systems["theirs"])
    host.publish(systems["ci"])
    assert host.collect().returncode == 0
    assert host.snapshot()["state"] == "dirty"
    result = host.run_agent("status", env=WIDE)
    assert result.returncode == 0, result
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("hand deploy")]
    assert line == (
        "hand deploy changed 4 packages against the deployed system: nginx 1.26.1 → 1.27.0,"
        " nixos-system-ours-ours (removed), nixos-system-theirs-theirs (added), vim 9.0 (removed)"
    )
    hand = json.loads(host.status("--json").stdout)["hand_changes"]
    assert (hand["from"], hand["to"]) == (systems["ours"].path, systems["theirs"].path)
    assert hand["counts"]["upgraded"] == 1
    # Once the host is tracked again, the hand deploy's difference is gone.
    host.write_deployed(systems["theirs"])
    assert host.collect().returncode == 0
    assert host.read_json("diff.json")["hand"] is None
    assert json.loads(host.status("--json").stdout)["hand_changes"] is None


def test_status_colours_only_on_a_terminal(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    assert host.collect().returncode == 0

    piped = host.status()
    assert piped.returncode == 0, piped
    assert "untracked" in piped.stdout
    assert "\x1b[" not in piped.stdout

    code, output = host.on_a_terminal("status", columns=120)
    assert code == 0
    assert b"untracked" in output
    assert b"\x1b[" in output


# ---- diff ---------------------------------------------------------------------------


NAMES = ("current", "booted", "deployed", "upstream", "profile")


def five_systems(host: Host) -> dict[str, System]:
    """Each of the five names on a system of its own: `pkg` at version 1..5."""
    built = host.build(
        *(SystemSpec(name, packages=(Package("pkg", f"{i}.0"),)) for i, name in enumerate(NAMES, 1))
    )
    host.install(built["booted"])
    host.realise(built["deployed"])
    host.write_deployed(built["deployed"])
    host.deploy_by_hand(built["profile"], "boot")
    host.deploy_by_hand(built["current"], "test")
    host.publish(built["upstream"])
    assert host.collect().returncode == 0
    return built


def test_diff_between_every_pair_of_names(host: Host) -> None:
    built = five_systems(host)
    version = {name: f"{i}.0" for i, name in enumerate(NAMES, 1)}
    for source, target in itertools.product(NAMES, NAMES):
        result = host.run_agent("diff", "--json", source, target)
        assert result.returncode == 0, result
        shown = json.loads(result.stdout)
        assert (shown["from"], shown["to"]) == (built[source].path, built[target].path)
        pkg = [c for c in shown["changes"] if c["name"] == "pkg"]
        if source == target:
            assert shown["changes"] == [] and pkg == []
            continue
        kind = "upgraded" if version[target] > version[source] else "downgraded"
        assert pkg == [
            {"name": "pkg", "before": [version[source]], "after": [version[target]], "kind": kind}
        ]


def test_diff_defaults_to_current_upstream_and_takes_store_paths(host: Host) -> None:
    old, new = versioned_update(host)
    by_default = host.run_agent("diff", "--json")
    assert by_default.returncode == 0, by_default
    shown = json.loads(by_default.stdout)
    assert shown["changes"] == expected_json_changes()
    assert shown["size_after"] > 0
    by_path = host.run_agent("diff", "--json", new.path, old.path)
    assert by_path.returncode == 0, by_path
    reverse = json.loads(by_path.stdout)
    assert [(c["name"], c["before"], c["after"]) for c in reverse["changes"]] == [
        (c["name"], c["after"], c["before"]) for c in expected_json_changes()
    ]
    assert (reverse["size_before"], reverse["size_after"]) == (
        shown["size_after"],
        shown["size_before"],
    )
    (host.tmp / "result").symlink_to(new.path)
    via_link = host.run_agent("diff", "--json", "current", str(host.tmp / "result"))
    assert json.loads(via_link.stdout)["changes"] == expected_json_changes()


def test_diff_table(host: Host) -> None:
    versioned_update(host)
    result = host.run_agent("diff", env=WIDE)
    assert result.returncode == 0, result
    assert "\x1b[" not in result.stdout, "colour codes on a stdout that is not a terminal"
    rows = [
        [cell.strip() for cell in line.strip("│").split("│")]
        for line in result.stdout.splitlines()
        if line.startswith("│") and "│ kind" not in line and "name" not in line.split("│")[1]
    ]

    def versions(vs: tuple[str, ...]) -> str:
        return ", ".join(v or "-" for v in vs) or "none"

    expected = [[c.name, versions(c.before), versions(c.after), c.kind.value] for c in EXPECTED]
    assert rows == expected
    assert "changes 16 packages" in result.stdout


def test_diff_with_nothing_to_show_says_no_changes(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    assert host.collect().returncode == 0
    result = host.run_agent("diff", env=WIDE)
    assert result.returncode == 0, result
    assert result.stdout == f"no changes: {system.basename} → {system.basename}\n", result


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("/tmp/not-a-store-path", "current"), "neither current, booted"),
        (("/nix/store/00000000000000000000000000000000-gone-1.0", "current"), "is not valid"),
        (("nonsense", "current"), "neither current, booted"),
        (("current",), "two: FROM TO"),
        (("current", "upstream", "booted"), "two: FROM TO"),
        (("/nix/store/00000000000000000000000000000000-x/../etc", "current"), "neither"),
    ],
)
def test_diff_of_bad_input_says_so_in_one_line(
    host: Host, args: tuple[str, ...], says: str
) -> None:
    versioned_update(host)
    before = (host.state_dir / "diff.json").read_bytes()
    result = host.run_agent("diff", *args)
    assert result.returncode == 1, result
    (line,) = error_lines(result)
    assert says in line
    no_traceback(result)
    assert (host.state_dir / "diff.json").read_bytes() == before


def test_diff_on_a_host_without_upstream(host: Host) -> None:
    host.install(host.build_one("a"))
    result = host.run_agent("diff")
    assert result.returncode == 1, result
    assert error_lines(result) == ["error: this host has no upstream system (yet)"]


# ---- log ----------------------------------------------------------------------------


def collect_then_deploy(host: Host, *args: str) -> AgentResult:
    """Collect (what CI published), then deploy."""
    assert host.collect().returncode == 0
    return deploy(host, *args)


def test_log_after_deploys_a_failed_deploy_and_a_reboot(host: Host) -> None:
    systems = host.build(
        SystemSpec("a"), SystemSpec("b"), SystemSpec("bad"), SystemSpec("c", kernel="6.6.1")
    )
    host.install(systems["a"])
    host.write_deployed(systems["a"])
    host.publish(systems["b"])
    assert collect_then_deploy(host).returncode == 0
    host.publish(systems["bad"])
    host.fail_activation(systems["bad"], "a unit failed")
    assert collect_then_deploy(host).returncode == 1
    host.publish(systems["c"])
    rebooting = collect_then_deploy(host, "--switch-mode", "boot", "--reboot-mode", "reboot")
    assert rebooting.returncode == 0, rebooting

    as_json = host.run_agent("log", "--json")
    assert as_json.returncode == 0, as_json
    entries = json.loads(as_json.stdout)
    assert [(e["event"], e.get("result") or e.get("action")) for e in entries] == [
        ("decision", "deploy"),
        ("health", None),
        ("deploy", "success"),
        ("decision", "deploy"),
        ("deploy", "failure"),
        ("rolled-back", None),
        ("decision", "deploy"),
        # A boot-mode deploy with a reboot is a trial boot: a success once confirmed.
        ("trial-reboot", None),
    ]
    assert [e["at"] for e in entries] == sorted(e["at"] for e in entries), "newest last"

    table = host.run_agent("log", env=WIDE)
    assert table.returncode == 0, table
    row = re.compile(r"│ \d{4}-\d\d-\d\d \d\d:\d\d:\d\d │ +(\d+[dhms] ?)+ │ (\S+) +│ (.*)│")
    rows = [m.groups()[1:] for m in map(row.match, table.stdout.splitlines()) if m]
    assert [event for event, _ in rows] == [e["event"] for e in entries]
    assert rows[1][1].startswith("passed on " + systems["b"].basename)
    assert rows[2][1].startswith("success (switch) " + systems["b"].basename)
    assert rows[4][1].startswith("failure (switch) " + systems["bad"].basename)
    assert rows[5][1].strip() == f"{systems['bad'].basename}, back to {systems['b'].basename}"
    assert rows[7][1].strip() == systems["c"].basename
    assert "a unit failed" in table.stdout

    last_two = json.loads(host.run_agent("log", "--json", "-n", "2").stdout)
    assert last_two == entries[-2:]


def test_log_skips_corrupt_lines_and_shows_unknown_events(host: Host) -> None:
    history = host.state_dir / "history.jsonl"
    good = {"at": 1_700_000_000.0, "event": "deploy", "path": "/nix/store/x", "result": "success"}
    unknown = {"at": 1_700_000_100.0, "event": "health-check", "check": "[nginx]", "ok": False}
    history.write_text(
        json.dumps(good) + "\n{cut short\n" + json.dumps([1]) + "\n" + json.dumps(unknown) + "\n"
    )
    result = host.run_agent("log", env=WIDE)
    assert result.returncode == 0, result
    assert result.stderr.splitlines() == [
        f"note: skipped line 2 of {history}: not a history entry",
        f"note: skipped line 3 of {history}: not a history entry",
    ]
    (row,) = [line for line in result.stdout.splitlines() if "health-check" in line]
    assert "check=[nginx] ok=False" in row
    entries = json.loads(host.run_agent("log", "--json").stdout)
    assert entries == [good, unknown]


def test_log_without_history(host: Host) -> None:
    result = host.run_agent("log")
    assert result.returncode == 0, result
    assert "no history" in result.stderr
    assert json.loads(host.run_agent("log", "--json").stdout) == []


@pytest.mark.parametrize("n", ["0", "-1", "x"])
def test_log_refuses_a_bad_count(host: Host, n: str) -> None:
    result = host.run_agent("log", "-n", n)
    assert result.returncode == 2, result
    assert "not a positive number" in result.stderr
    no_traceback(result)
