"""What will change and what happened: the collector's diff.json and metrics, the status
summary, `diff` and `log`, against real Nix, real closures and the real actuator."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import pytest
from harness import AgentResult, Host, Package, System, SystemSpec, error_lines, metric
from test_closure import EXPECTED, NEW, OLD
from test_resident import RARELY, resident

pytestmark = pytest.mark.nix

NIX_TOOLS = ("nix-store", "nix-env", "nix")
WIDE = {"COLUMNS": "250"}


def versioned_update(host: Host) -> tuple[System, System]:
    """A tracked host running old (kernel 6.6.41), collected after CI published new."""
    systems = host.build(
        SystemSpec("old", kernel="6.6.41", tag="24.05.1", packages=OLD),
        SystemSpec("new", kernel="6.6.44", tag="24.05.2", packages=NEW),
    )
    old, new = systems["old"], systems["new"]
    host.install(old)
    host.write_deployed(old)
    host.publish(new)
    collected = host.collect()
    assert collected.returncode == 0, collected
    return old, new


def expected_counts() -> dict[str, int]:
    kinds = [c.kind.value for c in EXPECTED]
    return {k: kinds.count(k) for k in ("added", "removed", "upgraded", "downgraded", "changed")}


def expected_json_changes() -> list[dict[str, Any]]:
    return [c.to_json() for c in EXPECTED]


def no_traceback(result: AgentResult) -> None:
    assert "Traceback" not in result.stderr, result


# ---- the collector ------------------------------------------------------------------------


def test_collect_keeps_the_difference_and_exports_it(host: Host) -> None:
    old, new = versioned_update(host)
    kept = host.read_json("diff.json")
    assert kept["version"] == 1
    upstream = kept["upstream"]
    assert (upstream["from"], upstream["to"], upstream["error"]) == (old.path, new.path, None)
    assert upstream["changes"] == expected_json_changes()
    assert upstream["counts"] == expected_counts()
    assert upstream["boot_files"] == ["kernel", "initrd", "kernel-modules"]
    assert kept["hand"] is None
    text = host.metrics()
    for kind, count in expected_counts().items():
        assert metric(text, "nixos_autodeploy_pending_changes", kind=kind) == count
    assert (
        metric(text, "nixos_autodeploy_closure_size_bytes", system="current")
        == upstream["size_before"]
    )
    assert (
        metric(text, "nixos_autodeploy_closure_size_bytes", system="upstream")
        == upstream["size_after"]
    )
    assert upstream["size_before"] > 0 and upstream["size_after"] > 0


def test_no_change_collect_runs_no_nix_and_keeps_diff_json(host: Host) -> None:
    versioned_update(host)
    kept = (host.state_dir / "diff.json").read_bytes()
    spawned = host.spawn_count(*NIX_TOOLS)
    again = host.collect()
    assert again.returncode == 0, again
    assert host.spawn_count(*NIX_TOOLS) == spawned
    assert (host.state_dir / "diff.json").read_bytes() == kept
    assert metric(host.metrics(), "nixos_autodeploy_pending_changes", kind="upgraded") == 8


def test_the_difference_follows_a_new_upstream(host: Host) -> None:
    old, _ = versioned_update(host)
    newer = host.build_one("newer", kernel="6.6.41", tag="24.05.3", packages=OLD[1:])
    host.publish(newer)
    assert host.collect().returncode == 0
    upstream = host.read_json("diff.json")["upstream"]
    assert (upstream["from"], upstream["to"]) == (old.path, newer.path)
    # Only the top level and the package it dropped differ; the same kernel: no reboot.
    assert [(c["name"], c["kind"]) for c in upstream["changes"]] == [
        ("nixos-system-newer", "added"),
        ("nixos-system-old", "removed"),
        ("up", "removed"),
    ]
    assert upstream["boot_files"] == []


def test_pending_changes_are_zero_when_current_is_upstream(host: Host) -> None:
    system = host.build_one("a", packages=(Package("nginx", "1.27.0"),))
    host.install(system)
    host.write_deployed(system)
    host.publish(system)
    assert host.collect().returncode == 0
    text = host.metrics()
    for kind in ("added", "removed", "upgraded", "downgraded", "changed"):
        assert metric(text, "nixos_autodeploy_pending_changes", kind=kind) == 0
    current = metric(text, "nixos_autodeploy_closure_size_bytes", system="current")
    assert current == metric(text, "nixos_autodeploy_closure_size_bytes", system="upstream") > 0
    status = host.status()
    assert status.returncode == 0, status
    assert "upstream changes" not in status.stdout


def test_resident_polls_compute_the_difference_only_when_a_system_moves(host: Host) -> None:
    old, _ = versioned_update(host)  # a one-shot collect wrote diff.json
    kept = (host.state_dir / "diff.json").read_bytes()
    spawned = host.spawn_count(*NIX_TOOLS)
    with resident(host, RARELY) as agent:
        agent.next_message()
        agent.poll()
        assert host.spawn_count(*NIX_TOOLS) == spawned, "no-change polls run no Nix"
        assert (host.state_dir / "diff.json").read_bytes() == kept
        # Rewritten behind its back (by a one-shot or the actuator): read again, not kept.
        (host.state_dir / "diff.json").write_text("{not json")
        agent.poll()
        assert json.loads((host.state_dir / "diff.json").read_bytes()) == json.loads(kept)
        newer = host.build_one("newer", kernel="6.6.41", tag="24.05.3", packages=OLD)
        host.publish(newer)
        agent.poll()
        returncode, stderr = agent.stop()
    assert returncode == 0, stderr
    assert "diff.json is corrupt" in stderr
    upstream = host.read_json("diff.json")["upstream"]
    assert (upstream["from"], upstream["to"]) == (old.path, newer.path)
    assert metric(host.metrics(), "nixos_autodeploy_pending_changes", kind="upgraded") == 0


def test_a_corrupt_diff_json_is_computed_afresh(host: Host) -> None:
    versioned_update(host)
    (host.state_dir / "diff.json").write_text("{not json")
    again = host.collect()
    assert again.returncode == 0, again
    assert "diff.json is corrupt" in again.stderr
    assert host.read_json("diff.json")["upstream"]["counts"] == expected_counts()
    no_traceback(again)


# ---- status -------------------------------------------------------------------------------


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


# ---- diff ---------------------------------------------------------------------------------

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


# ---- log ----------------------------------------------------------------------------------


def deploy(host: Host, *args: str) -> AgentResult:
    """Collect (what CI published), then deploy."""
    assert host.collect().returncode == 0
    url_args = ("--url", host.url, "--timeout", "30", "--prometheus-path", str(host.metrics_path))
    return host.run_agent("deploy", *url_args, *args)


def test_log_after_deploys_a_failed_deploy_and_a_reboot(host: Host) -> None:
    systems = host.build(
        SystemSpec("a"), SystemSpec("b"), SystemSpec("bad"), SystemSpec("c", kernel="6.6.1")
    )
    host.install(systems["a"])
    host.write_deployed(systems["a"])
    host.publish(systems["b"])
    assert deploy(host).returncode == 0
    host.publish(systems["bad"])
    host.fail_activation(systems["bad"], "a unit failed")
    assert deploy(host).returncode == 1
    host.publish(systems["c"])
    rebooting = deploy(host, "--switch-mode", "boot", "--reboot-mode", "reboot")
    assert rebooting.returncode == 0, rebooting

    as_json = host.run_agent("log", "--json")
    assert as_json.returncode == 0, as_json
    entries = json.loads(as_json.stdout)
    assert [(e["event"], e.get("result") or e.get("action")) for e in entries] == [
        ("decision", "deploy"),
        ("deploy", "success"),
        ("decision", "deploy"),
        ("deploy", "failure"),
        ("rolled-back", None),
        ("decision", "deploy"),
        ("deploy", "success"),
        ("reboot", None),
    ]
    assert [e["at"] for e in entries] == sorted(e["at"] for e in entries), "newest last"

    table = host.run_agent("log", env=WIDE)
    assert table.returncode == 0, table
    row = re.compile(r"│ \d{4}-\d\d-\d\d \d\d:\d\d:\d\d │ +(\d+[dhms] ?)+ │ (\S+) +│ (.*)│")
    rows = [m.groups()[1:] for m in map(row.match, table.stdout.splitlines()) if m]
    assert [event for event, _ in rows] == [e["event"] for e in entries]
    assert rows[1][1].startswith("success (switch) " + systems["b"].basename)
    assert rows[3][1].startswith("failure (switch) " + systems["bad"].basename)
    assert rows[4][1].strip() == f"{systems['bad'].basename}, back to {systems['b'].basename}"
    assert rows[6][1].startswith("success (boot) " + systems["c"].basename)
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
