{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    literalExpression
    mkEnableOption
    mkIf
    mkMerge
    mkOption
    optional
    optionalAttrs
    optionals
    types
    ;

  cfg = config.system.autoDeploy;

  settingsFormat = pkgs.formats.json { };

  # systemd's quoting for ExecStart, the same rule as nixpkgs' utils.escapeSystemdExecArg;
  # kept here so the module has no dependency on the `utils` module argument.
  escapeExecArg = arg: lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON (toString arg));
  escapeExecArgs = args: lib.concatMapStringsSep " " escapeExecArg args;

  isAbsolute = path: lib.hasPrefix "/" path;

  # Where the boot loader copies kernels and initrds: systemd-boot's XBOOTLDR partition or
  # its ESP; other boot loaders (GRUB, extlinux) copy them to /boot. `or`: older nixpkgs
  # lack xbootldrMountPoint, and a configuration without boot loader options has none.
  loader = config.boot.loader or { };
  systemdBoot = loader.systemd-boot.enable or false;
  bootLoaderDir =
    if systemdBoot then
      (if (loader.systemd-boot.xbootldrMountPoint or null) != null then
        loader.systemd-boot.xbootldrMountPoint
      else
        loader.efi.efiSysMountPoint or "/boot")
    else
      "/boot";
  inStore = path: lib.hasPrefix "${builtins.storeDir}/" path;

  # Secrets never enter the Nix store or the config file: systemd copies them into
  # the unit's credentials directory ($CREDENTIALS_DIRECTORY, "%d" in ExecStart).
  credentials =
    optional (cfg.bearerTokenFile != null) "bearer-token:${cfg.bearerTokenFile}"
    ++ optional (cfg.netrcFile != null) "netrc:${cfg.netrcFile}";
  credentialConfig = optionalAttrs (credentials != [ ]) { LoadCredential = credentials; };
  # The halt query's Prometheus has secrets of its own; only the actuator asks it.
  halt = cfg.halt;
  haltCredentials =
    optional (halt != null && halt.bearerTokenFile != null) "prometheus-bearer-token:${halt.bearerTokenFile}"
    ++ optional (halt != null && halt.netrcFile != null) "prometheus-netrc:${halt.netrcFile}";
  actuatorCredentials = credentials ++ haltCredentials;
  # Not escaped on purpose: systemd must expand the %d specifier.
  credentialArgs =
    optionals (cfg.bearerTokenFile != null) [
      "--bearer-token-file"
      "%d/bearer-token"
    ]
    ++ optionals (cfg.netrcFile != null) [
      "--netrc-file"
      "%d/netrc"
    ];
  haltCredentialArgs =
    optionals (halt != null && halt.bearerTokenFile != null) [
      "--prometheus-bearer-token-file"
      "%d/prometheus-bearer-token"
    ]
    ++ optionals (halt != null && halt.netrcFile != null) [
      "--prometheus-netrc-file"
      "%d/prometheus-netrc"
    ];

  # The collector may write under /run only here (systemd's RuntimeDirectory): the upstream GC
  # root and the deployed mirror. /run/upstream-system and /run/deployed-system, the original
  # tool's places, are links into it (tmpfiles below).
  runtimeDir = "/run/nixos-autodeploy";
  ownLinks = [
    "upstream-system"
    "deployed-system"
  ];

  upstreamSettings = {
    url = cfg.url;
    timeout = cfg.timeout;
    runtime_dir = runtimeDir;
    min_free_store = cfg.minFreeStore;
    boot_dir = cfg.bootDir;
  }
  // optionalAttrs (cfg.extraHeaders != { }) {
    headers = lib.mapAttrsToList (name: value: "${name}: ${value}") cfg.extraHeaders;
  }
  // optionalAttrs (cfg.caFile != null) { ca_file = "${cfg.caFile}"; }
  // optionalAttrs (cfg.trustedKeys != [ ]) {
    trusted_keys = cfg.trustedKeys;
    signatures_required = cfg.signaturesRequired;
  }
  // optionalAttrs (cfg.hostName != "") { host_name = cfg.hostName; }
  // optionalAttrs (cfg.prometheusFilePath != null) { prometheus_path = cfg.prometheusFilePath; };

  # Without the actuator nothing else records what runs: the collector accepts what an
  # operator deployed when it is upstream, so a later publish reads as an update, not dirty.
  collectorSettings =
    upstreamSettings
    // optionalAttrs (!cfg.actuator.enable) { track = true; }
    // optionalAttrs resident { every = cfg.collector.pollInterval; };

  actuatorSettings =
    upstreamSettings
    // {
      switch_mode = cfg.switchMode;
    }
    // optionalAttrs (cfg.rebootMode != null) { reboot_mode = cfg.rebootMode; }
    // optionalAttrs (cfg.maxSnapshotAge != null) { max_snapshot_age = cfg.maxSnapshotAge; }
    // {
      min_free_boot = cfg.minFreeBoot;
      keep_generations = cfg.keepGenerations;
      prune_foreign = cfg.pruneForeign;
    }
    // {
      health_checks = health.enable;
      health_commands = health.commands;
      health_urls = health.urls;
      health_units = health.units;
      health_ignore_units = health.ignoreUnits;
      health_timeout = health.timeout;
    }
    // optionalAttrs (windowSpecs != [ ]) { reboot_windows = windowSpecs; }
    // optionalAttrs (cfg.fleetLock != null) {
      fleet_lock_url = cfg.fleetLock.url;
      fleet_lock_group = cfg.fleetLock.group;
    }
    // optionalAttrs (cfg.rolloutWariness != null) { rollout_wariness = cfg.rolloutWariness; }
    // optionalAttrs (halt != null) {
      halt_query = halt.query;
      prometheus_url = halt.prometheusUrl;
    }
    // optionalAttrs (halt != null && halt.caFile != null) { prometheus_ca_file = "${halt.caFile}"; };

  health = cfg.healthChecks;

  # What the actuator's two units share (serviceConfig: what differs).
  actuatorService = serviceConfig: {
    # It may be running the very activation that changes it: never restart or
    # stop it from switch-to-configuration.
    restartIfChanged = false;
    unitConfig.X-StopOnRemoval = false;
    environment = config.networking.proxy.envVars;
    path = health.path; # for the health check commands
    # Not sandboxed: it sets the system profile and runs switch-to-configuration
    # (through systemd-run), reboots and kexecs.
    serviceConfig = {
      ExecStart = actuatorCommand;
      StateDirectory = "nixos-autodeploy";
    }
    // serviceConfig
    // runtimeDirectory
    // optionalAttrs (actuatorCredentials != [ ]) { LoadCredential = actuatorCredentials; };
  };

  collectorConfigFile = settingsFormat.generate "nixos-autodeploy-collector.json" collectorSettings;
  actuatorConfigFile = settingsFormat.generate "nixos-autodeploy-actuator.json" actuatorSettings;

  program = lib.getExe cfg.package;

  # "-": a failed collection does not leave the unit failed. switch-to-configuration reports
  # every failed unit and exits 4 (see docs/CONTRACT.md), so a failing collector would fail
  # each nixos-rebuild switch; the failure is in the journal and in the metrics
  # (nixos_autodeploy_upstream_fetch_success, the collector-stale alert).
  collectorCommand = lib.concatStringsSep " " (
    [
      ("-" + escapeExecArgs [
        program
        "collect"
        "--config"
        collectorConfigFile
      ])
    ]
    ++ credentialArgs
  );

  # "-" too: a failed deploy (upstream down, a system rolled back) must not leave a failed
  # unit that fails every later nixos-rebuild or colmena switch with exit 4 and degrades
  # the system. It is in the journal, `status` and the metrics (the deploy, health and
  # rollback series and their alerts).
  actuatorCommand = lib.concatStringsSep " " (
    [
      ("-" + escapeExecArgs [
        program
        "deploy"
        "--config"
        actuatorConfigFile
      ])
    ]
    ++ credentialArgs
    ++ haltCredentialArgs
    ++ optional (cfg.extraArgs != [ ]) (escapeExecArgs cfg.extraArgs)
  );

  collectorUnit = "nixos-autodeploy-collector.service";

  resident = cfg.collector.resident;
  # systemd restarts a resident collector that has not finished a poll within this time:
  # the wait, the fetch's deadline, and up to half an hour for realising a new system.
  # The first poll (READY=1) gets as long.
  watchdogSec = cfg.collector.pollInterval + cfg.timeout + 1800;

  systemctl = "${config.systemd.package}/bin/systemctl";

  # What tells the collector that a system was activated: it only queues a collection
  # (--no-block), so nothing that runs it ever waits for one.
  notifyCollector = escapeExecArgs [
    systemctl
    "start"
    "--no-block"
    collectorUnit
  ];

  # The same for a resident collector: reload it (ExecReload sends SIGHUP: collect now), or
  # restart it when it still runs an older program or config (its command line does not
  # name the new ones; a switch does not restart it), or start it when it does not run.
  # Each only queues a job. "-": a reload of a collector that just exited must not fail
  # the switch.
  notifyResident = "-" + pkgs.writeShellScript "nixos-autodeploy-notify-resident" ''
    pid=$(${systemctl} show --property MainPID --value ${collectorUnit})
    if [ "''${pid:-0}" = 0 ]; then
      exec ${systemctl} start --no-block ${collectorUnit}
    fi
    if ${pkgs.gnugrep}/bin/grep -qaF -- ${cfg.package} /proc/$pid/cmdline \
      && ${pkgs.gnugrep}/bin/grep -qaF -- ${collectorConfigFile} /proc/$pid/cmdline; then
      exec ${systemctl} reload --no-block ${collectorUnit}
    fi
    exec ${systemctl} try-restart --no-block ${collectorUnit}
  '';

  # Both units share the runtime directory; it must outlive each run (it holds the GC root).
  runtimeDirectory = {
    RuntimeDirectory = "nixos-autodeploy";
    RuntimeDirectoryPreserve = true;
  };

  metricsDir = if cfg.prometheusFilePath == null then null else dirOf cfg.prometheusFilePath;

  # The program's own rule for `Name: value` (collector/config.py parse_header): an HTTP
  # token as the name, no line breaks in the value. Checked here so a bad header fails
  # the evaluation, not every collector run.
  badHeaders = lib.filterAttrs (
    name: value:
    builtins.match "[!#$%&'*+.^_`|~0-9A-Za-z-]+" name == null
    || lib.hasInfix "\n" value
    || lib.hasInfix "\r" value
  ) cfg.extraHeaders;

  # Reboot windows: `[DAYS ]HH:MM-HH:MM` strings, or NixOS autoUpgrade's `{ lower; upper; }`
  # (system.autoUpgrade.rebootWindow), so a configuration can move over as it is.
  windowSpecs = map (
    window: if builtins.isString window then window else "${window.lower}-${window.upper}"
  ) cfg.rebootWindows;
  # The program checks a spec fully (weekday names, times); this is the shape the timer
  # needs, so a malformed one fails the evaluation rather than the timer.
  windowParts =
    spec:
    builtins.match "(([^ ]+) +)?([0-9][0-9]:[0-9][0-9])-([0-9][0-9]:[0-9][0-9])" (
      lib.concatStringsSep " " (lib.filter (word: word != "") (lib.splitString " " spec))
    );
  badWindows = lib.filter (spec: windowParts spec == null) windowSpecs;
  # The actuator also runs when a window opens, so a reboot that waits for one happens
  # inside it without an operator. DAYS is systemd's weekday syntax, as in OnCalendar.
  windowOpenings = map (
    spec:
    let
      parts = windowParts spec;
      days = builtins.elemAt parts 1;
    in
    "${if days == null then "" else "${days} "}*-*-* ${builtins.elemAt parts 2}:00"
  ) (lib.filter (spec: windowParts spec != null) windowSpecs);

  # `{ lower = "01:00"; upper = "05:00"; }`: the window opens at lower and closes at
  # upper (HH:MM, local time; an upper before lower is the next day).
  windowBounds =
    types.addCheck (types.attrsOf (types.strMatching "[0-9][0-9]:[0-9][0-9]")) (
      bounds: builtins.attrNames bounds == [ "lower" "upper" ]
    )
    // {
      description = "{ lower = \"HH:MM\"; upper = \"HH:MM\"; }";
    };

  secretAssertion = option: value: {
    assertion = value == null || (isAbsolute value && !inStore value);
    message = "system.autoDeploy.${option} must be an absolute path outside the Nix store (it holds a secret), got: ${toString value}";
  };
in
{
  options.system.autoDeploy = {
    enable = mkEnableOption "automatic NixOS system deployments (the collector, and the actuator unless actuator.enable is false)";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix {
        nix = config.nix.package;
        systemd = config.systemd.package;
      };
      defaultText = literalExpression ''
        pkgs.callPackage ./package.nix {
          nix = config.nix.package;
          systemd = config.systemd.package;
        }
      '';
      description = "The nixos-autodeploy package to use.";
    };

    url = mkOption {
      type = types.str;
      example = "https://ci.example.org/hosts/web1/system";
      description = ''
        URL of a one-line file holding the store path of this host's system,
        as published by CI. The path is realised from the binary caches in
        {option}`nix.settings.substituters`, so the cache and its key must be
        configured there.
      '';
    };

    timeout = mkOption {
      type = types.ints.positive;
      default = 60;
      description = "Total deadline in seconds for fetching the upstream URL.";
    };

    extraHeaders = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        "X-Host" = "web1";
      };
      description = ''
        Extra HTTP headers sent with the upstream request. The values end up in
        the Nix store: use {option}`system.autoDeploy.bearerTokenFile` or
        {option}`system.autoDeploy.netrcFile` for secrets.
      '';
    };

    bearerTokenFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/autodeploy-token";
      description = ''
        File holding a bearer token for the upstream URL. Handed to the units with
        `LoadCredential`, so it can stay readable by root only; it never enters the
        Nix store. Give it as a string, not a Nix path.
      '';
    };

    netrcFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/autodeploy-netrc";
      description = ''
        A netrc file with credentials for the upstream URL, handed to the units
        with `LoadCredential` like {option}`system.autoDeploy.bearerTokenFile`.
      '';
    };

    caFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/etc/ssl/certs/internal-ca.pem";
      description = "CA bundle to verify the upstream URL's TLS certificate with, instead of the system's.";
    };

    trustedKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "release-1:Bx4sfDqWCnmB1aG9CW7Pz0Fyl8f7iNSZmA0T2tmD8cU=" ];
      description = ''
        Public keys (Nix's `name:base64` format, as
        `nix-store --generate-binary-cache-key` writes them) whose signed releases
        this host accepts. With keys, the URL must serve a signed release: a bare
        store path, an unsigned, expired or older release, or one without this
        host's entry is refused and changes nothing. Without keys, a bare store path
        works as before and an unsigned release is accepted unverified.
      '';
    };

    signaturesRequired = mkOption {
      type = types.ints.positive;
      default = 1;
      example = 2;
      description = ''
        How many valid signatures from distinct keys of
        {option}`system.autoDeploy.trustedKeys` a release needs.
      '';
    };

    hostName = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      example = "web1";
      description = ''
        This host's entry in the `systems` of a signed release (`"*"` is taken for a
        host the release does not name).
      '';
    };

    collectInterval = mkOption {
      type = types.str;
      default = "*:0/5";
      example = "*:0/15";
      description = ''
        With {option}`system.autoDeploy.collector.resident` set to `false`: when the
        collector checks upstream and refreshes the snapshot and metrics, as a calendar
        expression ({manpage}`systemd.time(7)`). It also runs shortly after boot and
        after every activation.
      '';
    };

    collector.resident = mkOption {
      type = types.bool;
      default = true;
      example = false;
      description = ''
        Whether the collector stays resident (`collect --every`, a `Type=notify`
        service with a watchdog) and polls every
        {option}`system.autoDeploy.collector.pollInterval` seconds, instead of
        starting from a timer. A resident poll that finds nothing changed costs a few
        milliseconds of CPU instead of an interpreter start (about a fifth of a
        second); the process holds about 31 MiB of memory (RSS). After every activation
        it is reloaded (SIGHUP: collect now), never waited on. `false` keeps the timer
        ({option}`system.autoDeploy.collectInterval`).
      '';
    };

    minFreeStore = mkOption {
      type = types.either types.ints.unsigned types.str;
      default = "1G";
      example = "4G";
      description = ''
        Space to leave free on the filesystem of the Nix store: before realising a new
        upstream, the collector asks Nix what it would download and unpack, and refuses
        (one `error:` line, nothing changed, the reason in `status`, retried at the next
        poll) when less than this would be left. Bytes, or a number with K, M, G or T.
        It removes nothing itself: `nix.gc` stays yours.
      '';
    };

    minFreeBoot = mkOption {
      type = types.either types.ints.unsigned types.str;
      default = "16M";
      example = "64M";
      description = ''
        Space to leave free on the boot filesystem
        ({option}`system.autoDeploy.bootDir`): before an activation that installs the
        boot loader (a switch, a boot, a trial boot's confirmation), the actuator
        compares the kernel and initrd the new system adds with its free space. Not
        enough: it first removes its own old generations
        ({option}`system.autoDeploy.keepGenerations`), then refuses before the system
        profile moves (one `error:` line; retried at the next run).
      '';
    };

    bootDir = mkOption {
      type = types.str;
      default = bootLoaderDir;
      defaultText = lib.literalMD ''
        systemd-boot's `xbootldrMountPoint`, else `boot.loader.efi.efiSysMountPoint`, when
        `boot.loader.systemd-boot.enable`; else `"/boot"`
      '';
      example = "/efi";
      description = ''
        The mount point of the filesystem the boot loader copies kernels and initrds
        to, whose free space {option}`system.autoDeploy.minFreeBoot` guards and the
        metrics report. Read from the boot loader's configuration.
      '';
    };

    keepGenerations = mkOption {
      type = types.ints.unsigned;
      default = 10;
      example = 5;
      description = ''
        After a deploy is confirmed (its health checks passed), remove the system
        profile generations the agent made beyond the newest this many; 0 never removes
        any. Never removed: the booted, the current and the profile's generation, and
        those a deploy under way or a pending trial boot needs. The boot loader's menu
        follows at its next install. Removing generations frees no store space by
        itself: garbage collection (`nix.gc`) stays yours.
      '';
    };

    pruneForeign = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Whether {option}`system.autoDeploy.keepGenerations` and the boot filesystem check
        may also remove generations the agent did not make (deployed by hand,
        `nixos-rebuild`).
      '';
    };

    collector.pollInterval = mkOption {
      type = types.ints.positive;
      default = 60;
      example = 300;
      description = ''
        Seconds between the starts of two polls of the resident collector (the first
        one waits a random part of a tenth of it, at most 5 s, so a fleet that starts
        together does not poll together).
      '';
    };

    prometheusFilePath = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/var/lib/prometheus-node-exporter/text-files/nixos-autodeploy.prom";
      description = ''
        If not `null`, the collector writes Prometheus metrics to this file, for
        the node exporter's textfile collector.
      '';
    };

    actuator.enable = mkOption {
      type = types.bool;
      default = true;
      example = false;
      description = ''
        Whether to install the actuator (`nixos-autodeploy.service` and its timer),
        which deploys the upstream system. When `false`, the host is only monitored:
        the collector still realises upstream and reports the state, and records a
        system deployed by hand as deployed when it is the upstream one (`collect --track`).
      '';
    };

    interval = mkOption {
      type = types.str;
      default = "04:42";
      example = "hourly";
      description = ''
        When the actuator runs, as a calendar expression ({manpage}`systemd.time(7)`).
      '';
    };

    randomizedDelay = mkOption {
      type = types.str;
      default = "0";
      example = "45min";
      description = ''
        Upper bound of a random delay added to {option}`system.autoDeploy.interval`
        ({manpage}`systemd.time(7)` time span). The delay is fixed per host, so a
        fleet spreads out while each host keeps a stable schedule.
      '';
    };

    switchMode = mkOption {
      type = types.enum [
        "switch"
        "boot"
        "smart"
      ];
      default = "switch";
      description = ''
        How the actuator applies an update:
        `switch` activates it now; `boot` makes it the system of the next boot;
        `smart` uses `boot` when kernel, initrd or kernel modules change and
        `switch` otherwise.
      '';
    };

    rebootMode = mkOption {
      type = types.nullOr (
        types.enum [
          "reboot"
          "kexec"
        ]
      );
      default = null;
      example = "reboot";
      description = ''
        If not `null`, reboot (or kexec into the new kernel) when an update needs it,
        at most once per deployment. With `null`, a pending reboot is only reported.
        A boot-mode deploy that reboots is a trial boot, confirmed by its health checks
        after the boot: `kexec` and `reboot` on a host booted by systemd-boot (a one-time
        entry, `bootctl set-oneshot`) leave the boot loader's default on the old system
        until then; `reboot` with another boot loader makes the new system the default
        first. See the README's table of what each protects against.
      '';
    };

    rebootWindows = mkOption {
      type = types.coercedTo windowBounds lib.singleton (
        types.listOf (types.either types.str windowBounds)
      );
      default = [ ];
      example = literalExpression ''
        [
          "Mon..Fri 02:00-04:00"
          "Sat,Sun 22:00-06:00"
        ]
      '';
      description = ''
        Maintenance windows for reboots and kexecs, in the host's local time:
        `[DAYS ]HH:MM-HH:MM`, DAYS in systemd's weekday syntax (`Mon..Fri`, `Sat,Sun`);
        a window may cross midnight (`22:00-02:00`, belonging to the day it opens on).
        NixOS autoUpgrade's shape, `{ lower = "01:00"; upper = "05:00"; }`, is accepted
        too, alone or in the list. With windows set, a deploy still switches at once,
        but a reboot waits for a window; the actuator also runs when each window
        opens, so a waiting reboot happens inside it. Keep
        {option}`system.autoDeploy.randomizedDelay` shorter than the windows.
      '';
    };

    fleetLock = mkOption {
      type = types.nullOr (
        types.submodule {
          options = {
            url = mkOption {
              type = types.str;
              example = "http://airlock.example.org:3333";
              description = ''
                Base URL of a FleetLock server (such as airlock); the actuator POSTs to
                `/v1/pre-reboot` and `/v1/steady-state` under it.
              '';
            };
            group = mkOption {
              type = types.strMatching "[a-zA-Z0-9.-]+";
              default = "default";
              example = "workers";
              description = "The FleetLock reboot group of this host.";
            };
          };
        }
      );
      default = null;
      example = literalExpression ''{ url = "http://airlock.example.org:3333"; group = "workers"; }'';
      description = ''
        Take a reboot slot from this FleetLock server before every reboot or kexec, so
        only as many hosts of a group reboot at once as the server has slots. No slot
        (refused, an error, no answer) means no reboot: the host stays pending and
        retries on the next actuator run. The slot goes back once the host is back on
        its new system; the actuator also runs two minutes after boot for that.
        The host's ID is derived from /etc/machine-id (see the README).
      '';
    };

    rolloutWariness = mkOption {
      type = types.nullOr (types.numbers.between 0 1);
      default = null;
      example = 0;
      description = ''
        This host's place in a release's phased rollout: 0 deploys at the rollout's start
        (canaries), 1 at its end. `null`: from the host's ID, spread evenly over the fleet
        and the same for every release.
      '';
    };

    halt = mkOption {
      type = types.nullOr (
        types.submodule {
          options = {
            query = mkOption {
              type = types.strMatching ".*[^[:space:]].*";
              example = "sum(increase(nixos_autodeploy_rollbacks_total[1h])) > 0";
              description = ''
                A PromQL instant query asked before every deploy of a new system: any
                sample whose value is not zero halts the deploy (the host stays
                update-available and says why). The README gives a default.
              '';
            };
            prometheusUrl = mkOption {
              type = types.str;
              example = "http://prometheus.example.org:9090";
              description = ''
                Base URL of the fleet's Prometheus (or Thanos, Mimir, VictoriaMetrics:
                anything that answers `/api/v1/query`).
              '';
            };
            bearerTokenFile = mkOption {
              type = types.nullOr types.str;
              default = null;
              example = "/run/secrets/prometheus-token";
              description = ''
                File holding a bearer token for the Prometheus URL, handed to the actuator
                with `LoadCredential` like {option}`system.autoDeploy.bearerTokenFile`.
              '';
            };
            netrcFile = mkOption {
              type = types.nullOr types.str;
              default = null;
              example = "/run/secrets/prometheus-netrc";
              description = "A netrc file with credentials for the Prometheus URL, handed over like the token.";
            };
            caFile = mkOption {
              type = types.nullOr types.path;
              default = null;
              example = "/etc/ssl/certs/internal-ca.pem";
              description = ''
                CA bundle to verify the Prometheus URL's TLS certificate with; by default
                {option}`system.autoDeploy.caFile`, else the system's.
              '';
            };
          };
        }
      );
      default = null;
      example = literalExpression ''{ query = "sum(increase(nixos_autodeploy_rollbacks_total[1h])) > 0"; prometheusUrl = "http://prometheus.example.org:9090"; }'';
      description = ''
        Halt this host's deploys of new systems while the fleet's own health says so: before
        each, the actuator asks this Prometheus the query; a non-zero sample, an error or no
        answer (fail closed) holds the deploy back. Finishing an interrupted deploy, a
        rollback and a reboot a deploy already needs are never held back.
      '';
    };

    maxSnapshotAge = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      example = 900;
      description = ''
        If not `null`, the actuator collects first (fetches and realises upstream
        again) when the snapshot's upstream was fetched longer ago than this many
        seconds; otherwise the program's default (3600) applies.
      '';
    };

    healthChecks = {
      enable = mkOption {
        type = types.bool;
        default = true;
        example = false;
        description = ''
          Whether the actuator checks the host, and rolls back when a check
          fails (the failed system is not retried until upstream changes).
          Checked are exactly: a deploy activated with `switch` (the `switch`
          mode, and the `smart` mode without a new kernel), right after the
          switch; and a trial boot (a `boot` or `smart` deploy with a
          {option}`system.autoDeploy.rebootMode`), by the run after that boot,
          before the new system becomes the boot default where it is not yet.
          Not checked: a `boot` or `smart` deploy without a reboot mode (the
          next boot is the operator's), a rollback, and hand deploys.
          Built in: systemd's verdict (`systemctl is-system-running --wait`;
          `degraded` fails unless every failed unit is in
          {option}`system.autoDeploy.healthChecks.ignoreUnits`), and the
          upstream URL still answering (a configuration that breaks the network
          rolls back). The lists below add the operator's own checks; all are
          retried until they pass or {option}`system.autoDeploy.healthChecks.timeout`.
        '';
      };

      commands = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "curl --fail --silent http://127.0.0.1:8080/healthz" ];
        description = ''
          Shell commands that must exit 0, each run with `-c` by the package's
          own shell (an absolute store path: a unit's `PATH` has no shell). They
          run in the actuator's unit, whose `PATH` is
          {option}`system.autoDeploy.healthChecks.path`, then nix, systemd and
          kexec-tools (the package's wrapper), then coreutils, findutils, gnugrep,
          gnused and systemd (what NixOS gives every unit): put the programs they
          need in {option}`system.autoDeploy.healthChecks.path`, or use absolute
          store paths like `''${pkgs.curl}/bin/curl`. Killed at the deadline; only
          the last lines of their output are kept.
        '';
      };

      path = mkOption {
        type = types.listOf (types.either types.package types.str);
        default = [ ];
        example = literalExpression "[ pkgs.curl pkgs.postgresql ]";
        description = "Packages on `PATH` for {option}`system.autoDeploy.healthChecks.commands`.";
      };

      urls = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "http://127.0.0.1:8080/healthz" ];
        description = ''
          HTTP(S) URLs that must answer with a 2xx status (redirects followed, at
          most 5). The upstream URL's credentials are not sent to them;
          {option}`system.autoDeploy.caFile` and the proxy settings apply.
        '';
      };

      units = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "nginx.service" "postgresql.service" ];
        description = "systemd units that must be active.";
      };

      ignoreUnits = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "flaky-backup.service" "user@*.service" ];
        description = ''
          Failed units that do not fail systemd's verdict (shell-style patterns;
          a name without a suffix means `.service`).
        '';
      };

      timeout = mkOption {
        type = types.ints.positive;
        default = 300;
        description = ''
          Seconds the checks may take to pass, retried a few seconds apart; a
          check still running at the deadline is killed and fails.
        '';
      };
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--debug" ];
      description = "Extra arguments appended to the actuator's command line (`nixos-autodeploy deploy`).";
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = lib.all (
            key: builtins.match "[^:[:space:]]+:[A-Za-z0-9+/]{43}=" key != null
          ) cfg.trustedKeys;
          message = "system.autoDeploy.trustedKeys must be Nix public keys (name:base64 of 32 bytes, as in trusted-public-keys), got: ${builtins.toJSON cfg.trustedKeys}";
        }
        {
          assertion = cfg.trustedKeys == [ ] || cfg.signaturesRequired <= lib.length cfg.trustedKeys;
          message = "system.autoDeploy.signaturesRequired (${toString cfg.signaturesRequired}) is more than the ${toString (lib.length cfg.trustedKeys)} trustedKeys: no release could ever be accepted";
        }
        {
          assertion = builtins.match "[a-zA-Z][a-zA-Z0-9+.-]*://.+" cfg.url != null;
          message = "system.autoDeploy.url must be the URL where CI publishes this host's store path (like https://ci.example.org/hosts/web1), got: \"${cfg.url}\"";
        }
        {
          assertion = cfg.rebootMode != null -> cfg.actuator.enable;
          message = "system.autoDeploy.rebootMode is set, but system.autoDeploy.actuator.enable is false: only the actuator reboots. Unset rebootMode or enable the actuator.";
        }
        {
          assertion = (cfg.rebootWindows != [ ] || cfg.fleetLock != null) -> cfg.actuator.enable;
          message = "system.autoDeploy.rebootWindows and fleetLock govern the actuator's reboots, but system.autoDeploy.actuator.enable is false.";
        }
        {
          assertion = badWindows == [ ];
          message = "system.autoDeploy.rebootWindows must be \"[DAYS ]HH:MM-HH:MM\" (like \"Mon..Fri 02:00-04:00\"), got: ${lib.concatMapStringsSep ", " builtins.toJSON badWindows}";
        }
        {
          assertion = cfg.fleetLock == null || builtins.match "https?://[^ /?#]+.*" cfg.fleetLock.url != null;
          message = "system.autoDeploy.fleetLock.url must be the http:// or https:// URL of a FleetLock server, got: \"${toString (cfg.fleetLock.url or "")}\"";
        }
        {
          assertion = cfg.extraArgs != [ ] -> cfg.actuator.enable;
          message = "system.autoDeploy.extraArgs are passed to the actuator, but system.autoDeploy.actuator.enable is false.";
        }
        {
          assertion = cfg.prometheusFilePath == null || isAbsolute cfg.prometheusFilePath;
          message = "system.autoDeploy.prometheusFilePath must be an absolute path, got: ${toString cfg.prometheusFilePath}";
        }
        {
          assertion = badHeaders == { };
          message = "system.autoDeploy.extraHeaders must map HTTP header names (letters, digits, !#$%&'*+-.^_`|~) to values without line breaks; invalid: ${lib.concatStringsSep ", " (builtins.attrNames badHeaders)}";
        }
        {
          assertion = lib.all (url: builtins.match "https?://[^/].*" url != null) health.urls;
          message = "system.autoDeploy.healthChecks.urls must be http:// or https:// URLs, got: ${lib.concatStringsSep ", " health.urls}";
        }
        (secretAssertion "bearerTokenFile" cfg.bearerTokenFile)
        (secretAssertion "netrcFile" cfg.netrcFile)
        (secretAssertion "halt.bearerTokenFile" (if halt == null then null else halt.bearerTokenFile))
        (secretAssertion "halt.netrcFile" (if halt == null then null else halt.netrcFile))
        {
          assertion = halt != null -> cfg.actuator.enable;
          message = "system.autoDeploy.halt holds back the actuator's deploys, but system.autoDeploy.actuator.enable is false.";
        }
        {
          assertion = halt == null || builtins.match "https?://[^ /?#]+.*" halt.prometheusUrl != null;
          message = "system.autoDeploy.halt.prometheusUrl must be the http:// or https:// URL of a Prometheus (or what answers its query API), got: \"${toString (halt.prometheusUrl or "")}\"";
        }
      ];

      # For `nixos-autodeploy status`.
      environment.systemPackages = [ cfg.package ];

      # The metrics directory must exist before the collector starts: ReadWritePaths
      # of a missing directory would fail the unit. "-" leaves an existing one as is.
      # "L+" replaces what an earlier version left at the old places (a GC root of its own).
      systemd.tmpfiles.rules =
        optional (metricsDir != null) "d ${metricsDir} - - - -"
        ++ map (name: "L+ /run/${name} - - - - ${runtimeDir}/${name}") ownLinks;

      systemd.services.nixos-autodeploy-collector = {
        description = "NixOS auto-deployment collector: observe upstream and the local system";
        after = [
          "network-online.target"
          "nix-daemon.socket"
        ];
        wants = [ "network-online.target" ];
        # Restarting a running oneshot waits for its run, a resident one's start for its
        # first poll: a switch that changes this unit would wait for a collection. The next
        # run uses the new unit anyway; a resident collector is restarted by the unit that
        # tells it about the activation, without waiting.
        restartIfChanged = false;
        wantedBy = optional resident "multi-user.target";
        environment = config.networking.proxy.envVars // {
          # Store operations (realising upstream, registering the GC root) go
          # through the daemon, so the sandbox below can keep /nix read-only.
          NIX_REMOTE = "daemon";
          XDG_CACHE_HOME = "/var/cache/nixos-autodeploy";
        };
        serviceConfig = {
          ExecStart = collectorCommand;
          StateDirectory = "nixos-autodeploy";
          CacheDirectory = "nixos-autodeploy";
          UMask = "0022"; # node_exporter must read the metrics file

          # Read-only but for the state, cache and runtime directories and the metrics one.
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          NoNewPrivileges = true;
          CapabilityBoundingSet = "";
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          ProtectProc = "invisible";
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          SystemCallArchitectures = "native";
          SystemCallFilter = [ "@system-service" ];
          # AF_UNIX also carries the notifications to systemd (NOTIFY_SOCKET).
          RestrictAddressFamilies = [
            "AF_UNIX"
            "AF_INET"
            "AF_INET6"
          ];
        }
        // (
          if resident then
            {
              Type = "notify"; # READY=1 after the first poll, WATCHDOG=1 after each
              ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
              # A hung collector: the watchdog. One that exited for any reason ("-" above
              # makes every exit a success: never a failed unit that would fail a switch)
              # is started again; `systemctl stop` is never undone.
              Restart = "always";
              RestartSec = "10s";
              WatchdogSec = toString watchdogSec;
              TimeoutStartSec = toString watchdogSec;
            }
          else
            { Type = "oneshot"; }
        )
        // optionalAttrs (metricsDir != null) { ReadWritePaths = [ metricsDir ]; }
        // runtimeDirectory
        // credentialConfig;
      };

      systemd.timers.nixos-autodeploy-collector = mkIf (!resident) {
        description = "NixOS auto-deployment collector";
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnCalendar = cfg.collectInterval;
          OnBootSec = "1min";
          Persistent = true;
        };
      };

      # A hand deploy (nixos-rebuild, colmena) shows within seconds: after every activation
      # (switch, test) switch-to-configuration starts the active targets again, which starts
      # this oneshot again (it does not remain active), at boot too. It only queues the
      # collector: the switch waits for no collection and cannot fail with one. No activation
      # script: they do nothing under system.nixos-init. When the actuator itself switches,
      # the queued collector finds the lock held and leaves the report to the actuator.
      systemd.services.nixos-autodeploy-activated = {
        description = "Tell the NixOS auto-deployment collector that a system was activated";
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          Type = "oneshot";
          ExecStart = if resident then notifyResident else notifyCollector;
        };
      };
    }

    (mkIf cfg.actuator.enable {
      # Type=exec, not oneshot: its timer is Persistent (and OnBootSec with FleetLock), so a
      # run can start while the boot is still running. Its systemd check waits for the end
      # of the boot (`is-system-running --wait`), i.e. for every pending job; a oneshot's
      # start job stays pending until its run ends, so the check would wait on itself,
      # time out and roll the good system back. An exec unit's start job ends at exec.
      systemd.services.nixos-autodeploy = actuatorService { Type = "exec"; } // {
        description = "NixOS auto-deployment actuator: deploy the upstream system when safe";
        # Starting the actuator refreshes the snapshot first; a failed collection
        # does not block it (the actuator re-checks what it acts on).
        after = [
          "network-online.target"
          collectorUnit
        ];
        wants = [
          "network-online.target"
          collectorUnit
        ];
      };

      # Once per boot, after multi-user.target: the actuator confirms (or rolls back) a
      # system on its trial boot before anything else, then goes on as on its timer.
      # Type=exec, so the boot is finished while it runs: its systemd check waits for
      # the end of the boot (`is-system-running --wait`), which a oneshot would hold up.
      # RemainAfterExit: once per boot. switch-to-configuration starts the active targets
      # after every activation, which would start it again after each switch.
      systemd.services.nixos-autodeploy-boot = actuatorService {
        Type = "exec";
        RemainAfterExit = true;
      }
      // {
        description = "NixOS auto-deployment actuator, once at boot: confirm a trial boot";
        wantedBy = [ "multi-user.target" ];
        after = [
          "multi-user.target"
          "network-online.target"
        ];
        wants = [ "network-online.target" ];
      };

      systemd.timers.nixos-autodeploy = {
        description = "NixOS auto-deployment actuator";
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnCalendar = if windowOpenings == [ ] then cfg.interval else [ cfg.interval ] ++ windowOpenings;
          RandomizedDelaySec = cfg.randomizedDelay;
          FixedRandomDelay = true;
          Persistent = true;
        }
        # Back from a reboot, the slot it took goes back without waiting for the next run.
        // optionalAttrs (cfg.fleetLock != null) { OnBootSec = "2min"; };
      };
    })
  ]);
}
