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
    # What NixOS's systemd-boot-builder does, on the ESP mounted at /boot: an entry per
    # generation (kernel and initrd copied under names derived from their store paths),
    # none for generations that are gone, and this system's newest generation the default.
    # Every file is written under a temporary name and renamed.
    put() { cat > "$1.tmp" && mv "$1.tmp" "$1"; }
    write_boot_entries() {
      profiles=/nix/var/nix/profiles
      mkdir -p /boot/EFI/nixos
      default=
      for generation in $(ls $profiles | sed -n 's/^system-\([0-9]*\)-link$/\1/p' | sort -n); do
        system=$(readlink -f "$profiles/system-$generation-link")
        for file in kernel initrd; do
          source=$(readlink -f "$system/$file")
          name=$(echo "''${source#/nix/store/}" | tr / -).efi
          if [ ! -f "/boot/EFI/nixos/$name" ]; then put "/boot/EFI/nixos/$name" < "$source"; fi
          eval "$file=/EFI/nixos/$name"
        done
        printf '%s\n' "title NixOS (generation $generation, $(cat "$system/nixos-version"))" \
          "version Generation $generation" "linux $kernel" "initrd $initrd" \
          "options init=$system/init $(cat "$system/kernel-params")" \
          | put "/boot/loader/entries/nixos-generation-$generation.conf"
        if [ "$system" = $out ]; then default=nixos-generation-$generation.conf; fi
      done
      for entry in /boot/loader/entries/nixos-generation-*.conf; do
        generation=''${entry#/boot/loader/entries/nixos-generation-}
        [ -L "$profiles/system-''${generation%.conf}-link" ] || rm -f "$entry"
      done
      for file in /boot/EFI/nixos/*.efi; do
        grep -qsF "/EFI/nixos/''${file##*/}" /boot/loader/entries/*.conf || rm -f "$file"
      done
      if [ -n "$default" ]; then
        printf 'timeout 0\ndefault %s\n' "$default" | put /boot/loader/loader.conf
      fi
    }
    note start
    case "$action" in switch) ${onSwitch} ;; esac
    case "$action" in switch|boot)
      ln -sfn $out $state/boot-entry.new && mv -T $state/boot-entry.new $state/boot-entry
      if [ -d /boot/loader/entries ]; then write_boot_entries; fi ;;
    esac
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

  mkSystem = { tag, kernel, activationSeconds ? 0, onSwitch ? ":", hasInit ? true, extraParams ? "" }:
    let k = kernelPackage kernel; in
    sh {
      inherit (k) linux modules;
      initrdPackage = k.initrd;
      kernelParams = "root=/dev/vda rw console=ttyS0 autodeploy=${tag}${extraParams}";
      switchScript = switchScript activationSeconds onSwitch;
      initScript = if hasInit then initScript else "";
    } "nixos-system-guest-${tag}" ''
      set -eu
      mkdir -p $out/bin
      ln -s $linux/bzImage $out/kernel
      ln -s $initrdPackage/initrd $out/initrd
      ln -s $modules $out/kernel-modules
      printf '%s' "$kernelParams" > $out/kernel-params
      echo ${tag} > $out/nixos-version
      printf '%s' "$switchScript" | sed "s|@out@|$out|g" > $out/bin/switch-to-configuration
      chmod +x $out/bin/switch-to-configuration
      if [ -n "$initScript" ]; then
        printf '%s' "$initScript" | sed "s|@out@|$out|g" > $out/init
        chmod +x $out/init
      fi
    '';
in {
  initial = mkSystem { tag = "initial"; kernel = "a"; };
  switched = mkSystem { tag = "switched"; kernel = "a"; };
  slow = mkSystem { tag = "slow"; kernel = "a"; activationSeconds = slowActivationSeconds; };
  kexeced = mkSystem { tag = "kexeced"; kernel = "b"; };
  rebooted = mkSystem { tag = "rebooted"; kernel = "a"; };
  # The update pending when the actuator's timer fires during a boot.
  pending = mkSystem { tag = "pending"; kernel = "a"; };
  # Its activation succeeds, but leaves a unit that failed to start: systemd is degraded.
  broken = mkSystem {
    tag = "broken";
    kernel = "a";
    onSwitch = "systemd-run --unit=autodeploy-guest-broken --service-type=oneshot /bin/false || true";
  };
  # Never reaches userspace: it has no init, so the stage 1 (the initramfs hook in image/)
  # panics under boot.panic_on_fail, which the agent adds to a kexec's command line; the
  # kernel's panic= then resets the machine.
  unbootable = mkSystem { tag = "unbootable"; kernel = "c"; hasInit = false; };
  # The same for a reboot trial, where the command line is the system's own: built as an
  # operator following the README would, with panic= and boot.panic_on_fail in its
  # kernel-params.
  unbootable-efi = mkSystem {
    tag = "unbootable-efi";
    kernel = "c";
    hasInit = false;
    extraParams = " panic=10 boot.panic_on_fail";
  };
  # Boots, but the operator's health check fails on it.
  unhealthy = mkSystem { tag = "unhealthy"; kernel = "b"; };
}
