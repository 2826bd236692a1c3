# NixOS VM test of module.nix: both units on a real NixOS guest.
# With the flake: `nix build .#checks.x86_64-linux.vm`.
# Without: `nix-build test.nix` (uses <nixpkgs>).
#
# Scenarios mirror the Python tests (tests/) and the original tool's test:
# fresh host matching upstream, fresh host differing (dirty), tracking host
# deploying a new upstream, manual deploy while tracking (dirty, left alone),
# a boot-mode deploy waiting for a reboot, and a monitoring-only host.
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
      };

      environment.systemPackages = [
        pkgs.curl
        pkgs.jq
      ];

      services.prometheus.exporters.node = {
        enable = true;
        enabledCollectors = [ "textfile" ];
        extraFlags = [ "--collector.textfile.directory=${metricsDir}" ];
      };

      # The scenarios start the units many times in a row.
      systemd.services.nixos-autodeploy.unitConfig.StartLimitIntervalSec = 0;
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
    # must come up in the newest generation, as on a real host.
    virtualisation.useBootLoader = true;
    virtualisation.memorySize = 1536;
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
      deployCommand = nodes.machine.systemd.services.nixos-autodeploy.serviceConfig.ExecStart;
    in
    ''
      import json

      BASE = "${base}"
      NEXT = "${next}"
      STATE = "/var/lib/nixos-autodeploy"
      published = 0


      def start_upstream(host):
          host.succeed("mkdir -p /srv/upstream")
          host.succeed(
              "systemd-run --unit upstream-http ${pkgs.darkhttpd}/bin/darkhttpd /srv/upstream"
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


      def metric(host, line):
          host.wait_until_succeeds(
              f"curl -sf http://127.0.0.1:9100/metrics | grep -qx '{line}'", timeout=30
          )


      def reset(host, deployed=None):
          """Forget what the agent knows; optionally record `deployed` as tracked."""
          host.succeed(
              f"rm -f {STATE}/deployed.json {STATE}/deploys.json {STATE}/upstream.json"
              f" {STATE}/snapshot.json /run/deployed-system"
          )
          if deployed is not None:
              record = {
                  "version": 1, "path": deployed, "mode": "switch",
                  "previous": None, "at": 0, "reboot_issued_at": None,
              }
              host.succeed(f"echo '{json.dumps(record)}' > {STATE}/deployed.json")
              host.succeed(f"ln -sfn {deployed} /run/deployed-system")


      def switch_by_hand(host, path):
          host.succeed(
              f"nix-env -p /nix/var/nix/profiles/system --set {path}"
              f" && {path}/bin/switch-to-configuration switch"
          )


      def quiesce(host):
          """The scenarios start the units themselves: stop the timers and any run they began."""
          host.succeed("systemctl stop nixos-autodeploy-collector.timer nixos-autodeploy-collector.service")
          host.execute("systemctl stop nixos-autodeploy.timer nixos-autodeploy.service")


      def current(host):
          return host.succeed("realpath /run/current-system").strip()


      start_all()
      for host in (machine, monitor):
          host.wait_for_unit("multi-user.target")
          host.wait_for_unit("prometheus-node-exporter.service")
          start_upstream(host)

      with subtest("units and timers are installed"):
          machine.wait_for_unit("nixos-autodeploy-collector.timer")
          machine.wait_for_unit("nixos-autodeploy.timer")
          machine.succeed("systemctl show -P ProtectSystem nixos-autodeploy-collector.service | grep -qx strict")
          assert current(machine) == BASE
          quiesce(machine)

      with subtest("fresh host matching upstream: starts tracking"):
          reset(machine)
          publish(machine, BASE)
          machine.succeed("systemctl start nixos-autodeploy.service")
          collect(machine)
          s = status(machine)
          assert s["deployed"] == BASE, s
          assert s["upstream"] == BASE, s
          assert not s["dirty"] and s["state"] == "up-to-date", s
          assert machine.succeed("realpath /run/upstream-system").strip() == BASE
          metric(machine, "nixos_autodeploy_dirty 0")

      with subtest("fresh host differing from upstream: dirty, nothing deployed"):
          reset(machine)
          publish(machine, NEXT)
          # Whether a suspended run exits 0 is the program's business; the state is ours.
          machine.execute("systemctl start nixos-autodeploy.service")
          collect(machine)
          s = status(machine)
          assert s["dirty"] and s["state"] == "dirty", s
          assert s["deployed"] is None, s
          assert current(machine) == BASE
          metric(machine, "nixos_autodeploy_dirty 1")

      with subtest("tracking host and new upstream: deploys it"):
          reset(machine, deployed=BASE)
          publish(machine, NEXT)
          machine.succeed("systemctl start nixos-autodeploy.service")
          collect(machine)
          assert current(machine) == NEXT
          assert machine.succeed("cat /etc/autodeploy-generation").strip() == "next"
          s = status(machine)
          assert s["deployed"] == NEXT and s["profile"] == NEXT, s
          assert not s["dirty"] and s["state"] == "up-to-date", s
          metric(machine, "nixos_autodeploy_dirty 0")
          metric(machine, 'nixos_autodeploy_deployments_total{result="success"} 1')

      with subtest("manual deploy while tracking: dirty within seconds, left alone"):
          reset(machine, deployed=NEXT)
          publish(machine, NEXT)
          collect(machine)
          switch_by_hand(machine, BASE)
          # The activation hook restarted the collector: no timer needed.
          machine.wait_until_succeeds(
              "nixos-autodeploy status --json | jq -e '.dirty == true'", timeout=60
          )
          metric(machine, "nixos_autodeploy_dirty 1")
          machine.execute("systemctl start nixos-autodeploy.service")
          assert current(machine) == BASE, "the actuator overrode a manual deploy"
          assert status(machine)["deployed"] == NEXT

      with subtest("boot-mode deploy waits for a reboot"):
          reset(machine, deployed=BASE)
          publish(machine, NEXT)
          collect(machine)
          # The unit's own command line, with the mode overridden (flags win over the config).
          machine.succeed(${builtins.toJSON "${deployCommand} --switch-mode boot"})
          collect(machine)
          s = status(machine)
          assert current(machine) == BASE
          assert s["profile"] == NEXT and s["deployed"] == NEXT, s
          assert s["state"] == "pending-reboot" and s["reboot_required"] and not s["dirty"], s
          metric(machine, "nixos_autodeploy_reboot_required 1")

          machine.shutdown()
          machine.start()
          machine.wait_for_unit("multi-user.target")
          quiesce(machine)
          start_upstream(machine)
          assert current(machine) == NEXT, "the boot loader did not boot the deployed generation"
          collect(machine)
          s = status(machine)
          assert s["state"] == "up-to-date" and not s["reboot_required"], s
          metric(machine, "nixos_autodeploy_reboot_required 0")

      with subtest("monitoring-only host: observes, never deploys"):
          monitor.fail("systemctl cat nixos-autodeploy.service")
          monitor.fail("systemctl cat nixos-autodeploy.timer")
          monitor.wait_for_unit("nixos-autodeploy-collector.timer")
          quiesce(monitor)
          reset(monitor)
          publish(monitor, "${monitorNext}")
          collect(monitor)
          s = status(monitor)
          assert s["upstream"] == "${monitorNext}", s
          assert current(monitor) == "${monitorBase}"
          assert monitor.succeed("realpath /run/upstream-system").strip() == "${monitorNext}"
          metric(monitor, "nixos_autodeploy_upstream_fetch_success 1")
    '';
}
