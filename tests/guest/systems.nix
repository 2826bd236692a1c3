# Synthetic NixOS-like systems that really boot the Debian guest: the guest's
# own kernel and initrd, a kernel-params with an `autodeploy=<tag>` marker, an
# init that records itself (as NixOS's stage 2 does) and execs systemd, and a
# switch-to-configuration that does switch/boot/test on the guest's links.
# No nixpkgs: builders are /bin/sh with the build host's coreutils.
{ vmlinuz, initrd, slowActivationSeconds ? 45 }:
let
  system = "x86_64-linux";
  sh = args: name: script: derivation ({
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  } // args);

  kernelSource = builtins.path { path = vmlinuz; name = "guest-vmlinuz"; };
  initrdSource = builtins.path { path = initrd; name = "guest-initrd"; };

  # A "kernel package": same bytes for every variant, but a distinct store path
  # per variant, which is what a kernel change looks like to the agent.
  kernelPackage = variant: {
    linux = sh { inherit kernelSource; } "linux-guest-${variant}"
      ''mkdir -p $out && cp $kernelSource $out/bzImage'';
    initrd = sh { inherit initrdSource; } "initrd-guest-${variant}"
      ''mkdir -p $out && cp $initrdSource $out/initrd'';
    modules = sh { } "kernel-modules-guest-${variant}"
      ''mkdir -p $out/lib/modules && echo ${variant} > $out/lib/modules/variant'';
  };

  switchScript = activationSeconds: onSwitch: ''
    #!/bin/sh
    # switch-to-configuration for the guest. switch/boot make this the boot
    # loader's default entry; switch/test activate it (point current at it).
    # Every step is logged with this process's cgroup, so the test sees which
    # unit the activation ran in.
    set -eu
    out=@out@
    action=''${1:-}
    state=/var/lib/autodeploy-guest
    mkdir -p $state
    note() { echo "$1 $out $action $(date +%s) $(cat /proc/self/cgroup)" >> $state/activations.log; echo "switch-to-configuration: $1 $out $action"; }
    case "$action" in switch|boot|test) ;; *) echo "usage: $0 switch|boot|test" >&2; exit 1 ;; esac
    note start
    case "$action" in switch) ${onSwitch} ;; esac
    case "$action" in switch|boot) ln -sfn $out $state/boot-entry.new && mv -T $state/boot-entry.new $state/boot-entry ;; esac
    case "$action" in switch|test)
      if [ ${toString activationSeconds} -gt 0 ]; then sleep ${toString activationSeconds}; fi
      ln -sfn $out /run/current-system.new && mv -T /run/current-system.new /run/current-system ;;
    esac
    note done
  '';

  initScript = ''
    #!/bin/sh
    # Stage 2: record which system booted (the stage-2 service turns it into
    # /run/booted-system), then hand over to systemd.
    /bin/mkdir -p /var/lib/autodeploy-guest
    /bin/ln -sfn @out@ /var/lib/autodeploy-guest/booting
    exec /lib/systemd/systemd "$@"
  '';

  mkSystem = { tag, kernel, activationSeconds ? 0, onSwitch ? ":", root ? "/dev/vda rw" }:
    let k = kernelPackage kernel; in
    sh {
      inherit (k) linux modules;
      initrdPackage = k.initrd;
      kernelParams = "root=${root} console=ttyS0 autodeploy=${tag}";
      switchScript = switchScript activationSeconds onSwitch;
      inherit initScript;
    } "nixos-system-guest-${tag}" ''
      set -eu
      mkdir -p $out/bin
      ln -s $linux/bzImage $out/kernel
      ln -s $initrdPackage/initrd $out/initrd
      ln -s $modules $out/kernel-modules
      printf '%s' "$kernelParams" > $out/kernel-params
      echo ${tag} > $out/nixos-version
      printf '%s' "$switchScript" | sed "s|@out@|$out|g" > $out/bin/switch-to-configuration
      printf '%s' "$initScript" | sed "s|@out@|$out|g" > $out/init
      chmod +x $out/bin/switch-to-configuration $out/init
    '';
in {
  initial = mkSystem { tag = "initial"; kernel = "a"; };
  switched = mkSystem { tag = "switched"; kernel = "a"; };
  slow = mkSystem { tag = "slow"; kernel = "a"; activationSeconds = slowActivationSeconds; };
  kexeced = mkSystem { tag = "kexeced"; kernel = "b"; };
  rebooted = mkSystem { tag = "rebooted"; kernel = "a"; };
  # Its activation succeeds, but leaves a unit that failed to start: systemd is degraded.
  broken = mkSystem {
    tag = "broken";
    kernel = "a";
    onSwitch = "systemd-run --unit=autodeploy-guest-broken --service-type=oneshot /bin/false || true";
  };
  # Never reaches userspace: its root device does not exist, so the initramfs gives up
  # and (with the agent's panic=) resets the machine.
  unbootable = mkSystem { tag = "unbootable"; kernel = "c"; root = "/dev/vdz rootdelay=3"; };
  # Boots, but the operator's health check fails on it.
  unhealthy = mkSystem { tag = "unhealthy"; kernel = "b"; };
}
