# NixOS VM test of module.nix: both units on a real NixOS guest.
# With the flake: `nix build .#checks.x86_64-linux.vm`.
# Without: `nix-build test.nix` (uses <nixpkgs>).
#
# Scenarios mirror tests/test_deploy.py (which proves them against a sandbox
# root) and the original tool's test: fresh host matching upstream (tracks it),
# fresh host differing (dirty: deploy exits 0 and changes nothing), a dry run
# (fetches nothing; fails without a snapshot), tracking host deploying a new
# upstream, manual deploy while tracking (dirty, left alone), a boot-mode
# deploy waiting for a reboot and then rebooted into, a hand deploy while upstream is
# unreachable (the switch neither waits for nor fails with the collector), and a
# monitoring-only host.
{
  pkgs ? import <nixpkgs> { },
  module ? ./module.nix,
}:

let
  upstreamPort = 8080;
  metricsDir = "/run/metrics";

  # What both hosts share: the module, a local "CI" publishing the store path
  # over HTTP, and node_exporter reading the metrics file.
  common =
    { lib, pkgs, ... }:
    {
      imports = [ module ];

      system.autoDeploy = {
        enable = true;
        url = "http://127.0.0.1:${toString upstreamPort}/system";
        prometheusFilePath = "${metricsDir}/nixos-autodeploy.prom";
        # The scenarios collect when they need to (systemctl start): the one-shot
        # collector. The resident one is proven in tests/test_guest.py.
        collector.resident = false;
      };

      # In the system's closure: with useBootLoader the guest's store holds only that.
      environment.systemPackages = [
        pkgs.curl
        pkgs.jq
        pkgs.darkhttpd
      ];

      # The scenarios switch by hand and through the actuator.
      system.switch.enable = true;

      services.prometheus.exporters.node = {
        enable = true;
        enabledCollectors = [ "textfile" ];
        extraFlags = [ "--collector.textfile.directory=${metricsDir}" ];
      };

      # The scenarios start the collector many times in a row.
      systemd.services.nixos-autodeploy-collector.unitConfig.StartLimitIntervalSec = 0;

      # A second system to publish: same kernel, different /etc.
      specialisation.next.configuration = {
        environment.etc."autodeploy-generation".text = "next";
      };
      environment.etc."autodeploy-generation".text = lib.mkDefault "base";
    };
in
pkgs.testers.runNixOSTest {
  name = "nixos-autodeploy";

  nodes.machine = {
    imports = [ common ];
    # switch-to-configuration switch|boot installs the boot loader, and a reboot
    # must come up in the newest generation, as on a real host. EFI and systemd-boot
    # on both architectures: aarch64's machine type has no legacy BIOS for GRUB.
    virtualisation.useBootLoader = true;
    virtualisation.useEFIBoot = true;
    boot.loader.systemd-boot.enable = true;
    boot.loader.efi.canTouchEfiVariables = true;
    virtualisation.memorySize = 1536;
    # Only here: the monitoring-only node must have no actuator unit at all.
    systemd.services.nixos-autodeploy.unitConfig.StartLimitIntervalSec = 0;
  };

  nodes.monitor = {
    imports = [ common ];
    system.autoDeploy.actuator.enable = false;
  };

  testScript =
    { nodes, ... }:
    let
      base = nodes.machine.system.build.toplevel;
      next = nodes.machine.specialisation.next.configuration.system.build.toplevel;
      monitorBase = nodes.monitor.system.build.toplevel;
      monitorNext = nodes.monitor.specialisation.next.configuration.system.build.toplevel;
      # The actuator unit's own command line (no credentials here, so no %d in it), without
      # the "-" that keeps the unit from ending failed.
      deployCommand =
        pkgs.lib.removePrefix "-"
          nodes.machine.systemd.services.nixos-autodeploy.serviceConfig.ExecStart;
    in
    ''
      import json

      BASE = "${base}"
      NEXT = "${next}"
      STATE = "/var/lib/nixos-autodeploy"
      RUNTIME = "/run/nixos-autodeploy"
      DEPLOY = ${builtins.toJSON deployCommand}
      published = 0


      def start_upstream(host):
          host.succeed("mkdir -p /srv/upstream")
          host.succeed(
              "systemd-run --unit upstream-http /run/current-system/sw/bin/darkhttpd /srv/upstream"
              " --addr 127.0.0.1 --port ${toString upstreamPort}"
          )
          host.wait_for_open_port(${toString upstreamPort})


      def publish(host, path):
          # A fresh mtime per publication: the server's Last-Modified has one-second
          # resolution and the collector makes conditional requests.
          global published
          published += 1
          host.succeed(f"echo {path} > /srv/upstream/system")
          host.succeed(f"touch -d @{1700000000 + published} /srv/upstream/system")


      def status(host):
          return json.loads(host.succeed("nixos-autodeploy status --json"))


      def collect(host):
          host.succeed("systemctl start nixos-autodeploy-collector.service")


      def settle(host):
          """Wait for a collection a switch queued (nixos-autodeploy-activated) to end."""
          host.wait_until_succeeds(
              "test -z \"$(systemctl list-jobs --no-legend 'nixos-autodeploy-collector.*')\""
              " && systemctl show -P ActiveState nixos-autodeploy-collector.service"
              " | grep -qx inactive",
              timeout=120,
          )


      def actuate(host):
          # Exits 0 whatever the gate decides (dirty, up to date, ...); only errors fail it.
          host.succeed("systemctl start nixos-autodeploy.service")
          settle(host)


      def metric(host, line):
          host.wait_until_succeeds(
              f"curl -sf http://127.0.0.1:9100/metrics | grep -qx '{line}'", timeout=30
          )


      def record(host):
          """deployed.json, or None."""
          text = host.succeed(f"cat {STATE}/deployed.json 2>/dev/null || true")
          return json.loads(text) if text.strip() else None


      def mirror(host):
          """Where /run/deployed-system points, or None."""
          return host.succeed("realpath -e /run/deployed-system 2>/dev/null || true").strip() or None


      def last_decision(host):
          lines = host.succeed(f"cat {STATE}/history.jsonl").splitlines()
          decision = [json.loads(line) for line in lines if '"decision"' in line][-1]
          return decision["action"], decision["state"]


      def reset(host, deployed=None):
          """Forget what the agent knows; optionally record `deployed` as tracked (what the
          actuator writes when it accepts what runs: previous == path)."""
          host.succeed(
              f"rm -f {STATE}/deployed.json {STATE}/deploys.json {STATE}/upstream.json"
              f" {STATE}/snapshot.json {STATE}/history.jsonl {RUNTIME}/deployed-system"
          )
          if deployed is not None:
              tracked = {
                  "version": 1, "path": deployed, "mode": "switch", "previous": deployed,
                  "at": 0, "reboot_issued_at": None, "complete": True,
              }
              host.succeed(f"echo '{json.dumps(tracked)}' > {STATE}/deployed.json")
              host.succeed(f"ln -sfn {deployed} {RUNTIME}/deployed-system")


      def switch_by_hand(host, path):
          """As nixos-rebuild switch does; switch-to-configuration's exit code must be 0."""
          out = host.succeed(
              f"nix-env -p /nix/var/nix/profiles/system --set {path}"
              f" && {path}/bin/switch-to-configuration switch 2>&1"
          )
          settle(host)
          return out


      def invocation(host, unit):
          return host.succeed(f"systemctl show -P InvocationID {unit}").strip()


      def quiesce(host):
          """The scenarios start the units themselves: stop the timers and any run they began."""
          host.succeed("systemctl stop nixos-autodeploy-collector.timer nixos-autodeploy-collector.service")
          host.execute("systemctl stop nixos-autodeploy.timer nixos-autodeploy.service")


      def link(host, name):
          return host.succeed(f"realpath {name}").strip()


      def current(host):
          return link(host, "/run/current-system")


      start_all()
      for host in (machine, monitor):
          host.wait_for_unit("multi-user.target")
          host.wait_for_unit("prometheus-node-exporter.service")
          start_upstream(host)

      with subtest("units and timers are installed"):
          machine.wait_for_unit("nixos-autodeploy-collector.timer")
          machine.wait_for_unit("nixos-autodeploy.timer")
          machine.succeed("systemctl show -P ProtectSystem nixos-autodeploy-collector.service | grep -qx strict")
          # The collector writes under /run only in its runtime directory; the original
          # tool's places are links into it.
          rw = machine.succeed("systemctl show -P ReadWritePaths nixos-autodeploy-collector.service")
          assert "/run" not in rw.split(), rw
          for name in ("upstream-system", "deployed-system"):
              target = machine.succeed(f"readlink /run/{name}").strip()
              assert target == f"{RUNTIME}/{name}", target
          # Nothing of ours in an activation script or switch-to-configuration's lists.
          machine.fail("grep -rs nixos-autodeploy /run/nixos/")
          # switch-to-configuration must neither restart nor stop a running actuator.
          unit = machine.succeed("systemctl cat nixos-autodeploy.service")
          assert "X-RestartIfChanged=false" in unit and "X-StopOnRemoval=false" in unit, unit
          assert current(machine) == BASE
          quiesce(machine)

      with subtest("fresh host matching upstream: starts tracking"):
          reset(machine)
          publish(machine, BASE)
          actuate(machine)  # pulls in the collector first
          assert last_decision(machine) == ("track", "untracked")
          collect(machine)
          s = status(machine)
          assert s["deployed"] == BASE and s["deployed_mode"] == "switch", s
          assert s["upstream"] == BASE and s["upstream_error"] is None, s
          assert not s["dirty"] and s["state"] == "up-to-date", s
          assert record(machine)["previous"] == BASE and record(machine)["complete"] is True
          assert mirror(machine) == BASE
          assert link(machine, "/run/upstream-system") == BASE
          metric(machine, "nixos_autodeploy_dirty 0")

      with subtest("fresh host differing from upstream: dirty, deploy exits 0 and does nothing"):
          reset(machine)
          publish(machine, NEXT)
          actuate(machine)
          assert last_decision(machine) == ("nothing", "dirty")
          s = status(machine)
          assert s["dirty"] and s["state"] == "dirty", s
          assert s["deployed"] is None and s["upstream"] == NEXT, s
          assert record(machine) is None and mirror(machine) is None
          assert current(machine) == BASE
          assert link(machine, "/nix/var/nix/profiles/system") == BASE
          metric(machine, "nixos_autodeploy_dirty 1")

      with subtest("dry run: fetches nothing, fails without a snapshot, changes nothing"):
          reset(machine, deployed=BASE)
          publish(machine, NEXT)
          machine.succeed(f"! {DEPLOY} --dry-run 2> /tmp/dry-run.err")
          machine.succeed("grep -q 'no snapshot yet' /tmp/dry-run.err")
          machine.fail(f"test -e {STATE}/snapshot.json -o -e {STATE}/upstream.json")
          collect(machine)
          out = machine.succeed(f"{DEPLOY} --dry-run")
          assert "decision: deploy" in out and "would run: nix-env --profile" in out, out
          assert f"{NEXT}/bin/switch-to-configuration switch" in out, out
          assert current(machine) == BASE
          assert link(machine, "/nix/var/nix/profiles/system") == BASE
          assert record(machine)["path"] == BASE and record(machine)["at"] == 0

      with subtest("tracking host and new upstream: deploys it"):
          reset(machine, deployed=BASE)
          publish(machine, NEXT)
          actuate(machine)
          assert last_decision(machine) == ("deploy", "update-available")
          assert current(machine) == NEXT
          assert machine.succeed("cat /etc/autodeploy-generation").strip() == "next"
          r = record(machine)
          assert (r["path"], r["mode"], r["previous"], r["complete"]) == (NEXT, "switch", BASE, True), r
          assert mirror(machine) == NEXT
          collect(machine)
          s = status(machine)
          assert s["deployed"] == NEXT and s["profile"] == NEXT, s
          assert not s["dirty"] and s["state"] == "up-to-date", s
          assert s["last_deploy"]["result"] == "success" and s["last_deploy"]["path"] == NEXT, s
          metric(machine, "nixos_autodeploy_dirty 0")
          metric(machine, 'nixos_autodeploy_deployments_total{result="success"} 1')

      with subtest("manual deploy while tracking: dirty within seconds, left alone"):
          reset(machine, deployed=NEXT)
          publish(machine, NEXT)
          collect(machine)
          assert status(machine)["state"] == "up-to-date"
          switch_by_hand(machine, BASE)
          # The switch started nixos-autodeploy-activated, which queued the collector.
          machine.wait_until_succeeds(
              "nixos-autodeploy status --json | jq -e '.dirty == true'", timeout=60
          )
          metric(machine, "nixos_autodeploy_dirty 1")
          actuate(machine)
          assert last_decision(machine) == ("nothing", "dirty")
          assert current(machine) == BASE, "the actuator overrode a manual deploy"
          assert link(machine, "/nix/var/nix/profiles/system") == BASE
          assert status(machine)["deployed"] == NEXT

      with subtest("a hand deploy neither waits for nor fails with the collector"):
          reset(machine, deployed=BASE)
          machine.succeed("systemctl stop upstream-http")  # every collection now fails
          collect(machine)  # a failed collection does not leave the unit failed
          machine.fail("systemctl is-failed --quiet nixos-autodeploy-collector.service")
          assert status(machine)["upstream_error"], status(machine)
          for path in (NEXT, BASE):
              before = invocation(machine, "nixos-autodeploy-collector.service")
              out = switch_by_hand(machine, path)  # exit 4 would fail succeed()
              assert "units failed" not in out, out
              assert current(machine) == path
              # ... and the collector still learnt of it: a new run.
              assert invocation(machine, "nixos-autodeploy-collector.service") != before
              machine.fail("systemctl is-failed --quiet nixos-autodeploy-collector.service")
          metric(machine, "nixos_autodeploy_upstream_fetch_success 0")
          start_upstream(machine)

      with subtest("boot-mode deploy waits for a reboot, then the reboot completes it"):
          reset(machine, deployed=BASE)
          publish(machine, NEXT)
          collect(machine)
          # The unit's own command line, with the mode overridden (flags win over the config).
          machine.succeed(f"{DEPLOY} --switch-mode boot")
          collect(machine)
          s = status(machine)
          assert current(machine) == BASE
          assert s["profile"] == NEXT and s["deployed"] == NEXT, s
          assert s["deployed_mode"] == "boot", s
          assert s["state"] == "pending-reboot" and s["reboot_required"] and not s["dirty"], s
          metric(machine, "nixos_autodeploy_reboot_required 1")

          # No rebootMode is configured: the operator reboots.
          machine.shutdown()
          machine.start()
          machine.wait_for_unit("multi-user.target")
          quiesce(machine)
          start_upstream(machine)
          assert current(machine) == NEXT, "the boot loader did not boot the deployed generation"
          assert link(machine, "/run/booted-system") == NEXT
          actuate(machine)
          assert last_decision(machine) == ("nothing", "up-to-date")
          # The record lives in the state dir; its /run mirror, wiped by the reboot, is back.
          assert record(machine)["path"] == NEXT and mirror(machine) == NEXT
          s = status(machine)
          assert s["state"] == "up-to-date" and not s["reboot_required"], s
          metric(machine, "nixos_autodeploy_reboot_required 0")

      with subtest("monitoring-only host: observes and tracks, never deploys"):
          monitor.fail("systemctl cat nixos-autodeploy.service")
          monitor.fail("systemctl cat nixos-autodeploy.timer")
          monitor.wait_for_unit("nixos-autodeploy-collector.timer")
          quiesce(monitor)
          reset(monitor)
          publish(monitor, "${monitorBase}")
          collect(monitor)
          # What runs is upstream: the collector records it (there is no actuator to).
          s = status(monitor)
          assert s["state"] == "up-to-date" and s["deployed"] == "${monitorBase}", s
          publish(monitor, "${monitorNext}")
          collect(monitor)
          s = status(monitor)
          assert s["upstream"] == "${monitorNext}" and s["upstream_error"] is None, s
          assert s["state"] == "update-available" and not s["dirty"], s
          assert current(monitor) == "${monitorBase}"
          assert link(monitor, "/run/upstream-system") == "${monitorNext}"
          monitor.fail(f"test -e {STATE}/history.jsonl")  # no actuator, no decisions
          metric(monitor, "nixos_autodeploy_upstream_fetch_success 1")
          metric(monitor, "nixos_autodeploy_update_available 1")
    '';
}
