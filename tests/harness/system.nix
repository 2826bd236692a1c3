# Synthetic NixOS-like systems for the tests; no nixpkgs needed.
# specJSON: {"root": DIR, "salt": S,
#            "systems": [{"name","kernel","initrd","tag","extra","nixos","packages"}]}
# nixos = "": no bin/switch-to-configuration (a store path that is not a NixOS system).
# packages (optional): [{"name": store path name, "build": S}], each a store path of the
# system's closure; the same name and build in two systems is the same path.
# initrdSecrets (optional): "1" gives the system the `append-initrd-secrets` program that
# NixOS adds when boot.initrd.secrets is set.
# Result: one attribute per system name.
{ specJSON }:
let
  spec = builtins.fromJSON specJSON;

  # Every derivation carries the per-test salt so nothing is already valid
  # in the machine's /nix/store.
  mk = name: script: env: derivation ({
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-e" "-c" script ];
    PATH = "/usr/bin:/bin";
    salt = spec.salt;
  } // env);

  # Separate store paths, as on NixOS: systems with the same kernel version
  # share them, so "kernel differs" is visible both by link target and content.
  kernel = version: mk "linux-${version}" ''
    mkdir -p "$out/lib/modules/$version"
    printf 'Linux version %s (synthetic test kernel)\n' "$version" > "$out/bzImage"
  '' { inherit version; };

  kernelModules = version: mk "kernel-modules-${version}" ''
    mkdir -p "$out/lib/modules/$version"
    printf 'kernel/drivers/synthetic.ko:\n' > "$out/lib/modules/$version/modules.dep"
  '' { inherit version; };

  initrd = version: mk "initrd-${version}" ''
    mkdir -p "$out"
    printf 'synthetic initrd %s\n' "$version" > "$out/initrd"
  '' { inherit version; };

  package = p: mk p.name ''
    mkdir -p "$out"
    printf '%s\n' "$build" > "$out/build"
  '' { inherit (p) build; };

  switchToConfiguration = ''
    set -eu
    action="''${1:-}"
    case "$action" in
      switch|boot|test|dry-activate) ;;
      *) echo "Usage: $0 [switch|boot|test|dry-activate]" >&2; exit 1 ;;
    esac
    if [ -e "$root/slow-activation" ]; then sleep "$(cat "$root/slow-activation")"; fi
    echo "$action $out" >> "$root/activations.log"
    # <root>/fail-activation[-late]: the failing system's path, then the message.
    fails() { [ -e "$root/$1" ] && [ "$(head -n 1 "$root/$1")" = "$out" ]; }
    if fails fail-activation; then tail -n +2 "$root/fail-activation" >&2; exit 1; fi
    # Atomic like NixOS: a temporary link renamed over the old one.
    point() { ln -sfn "$out" "$1.tmp-$$"; mv -fT "$1.tmp-$$" "$1"; }
    case "$action" in
      switch) point "$root/boot/default"; point "$root/run/current-system" ;;
      boot) point "$root/boot/default" ;;
      test) point "$root/run/current-system" ;;
    esac
    # As NixOS's does when a unit fails to start: links and boot loader already switched.
    if fails fail-activation-late; then tail -n +2 "$root/fail-activation-late" >&2; exit 4; fi
  '';

  system = s: mk "nixos-system-${s.name}-${s.tag}" ''
    mkdir -p "$out/bin"
    ln -s "$kernel/bzImage" "$out/kernel"
    ln -s "$initrd/initrd" "$out/initrd"
    ln -s "$kernelModules" "$out/kernel-modules"
    printf 'loglevel=4 autodeploy=%s\n' "$tag" > "$out/kernel-params"
    printf '%s\n' "$tag" > "$out/nixos-version"
    printf '%s\n' "$extra" > "$out/extra"
    printf 'x86_64-linux' > "$out/system"
    printf '#!/bin/sh\necho "synthetic init of %s"\n' "$out" > "$out/init"
    for p in $packages; do printf '%s\n' "$p"; done > "$out/packages"
    chmod +x "$out/init"
    if [ -n "$initrdSecrets" ]; then
      printf '#!/bin/sh\necho "synthetic initrd secrets appender"\n' > "$out/append-initrd-secrets"
      chmod +x "$out/append-initrd-secrets"
    fi
    if [ -n "$nixos" ]; then
      { printf "#!/bin/sh\nroot='%s'\nout='%s'\n" "$root" "$out"; printf '%s' "$stc"; } \
        > "$out/bin/switch-to-configuration"
      chmod +x "$out/bin/switch-to-configuration"
    fi
  '' {
    kernel = kernel s.kernel;
    initrd = initrd s.initrd;
    kernelModules = kernelModules s.kernel;
    inherit (s) tag extra nixos;
    initrdSecrets = s.initrdSecrets or "";
    packages = map package (s.packages or [ ]);
    root = spec.root;
    stc = switchToConfiguration;
  };
in
builtins.listToAttrs (map (s: { name = s.name; value = system s; }) spec.systems)
