# Evaluates ../../module.nix with the real nixpkgs lib (lib.evalModules) and stub
# declarations for the NixOS options it sets, for tests/test_nix_files.py.
#
#   nix-instantiate --eval --strict --json tests/nix/eval-module.nix \
#     --argstr libPath /path/to/nixpkgs/lib --argstr casesJson '[{"enable": true, ...}]'
#
# Each case is the value of `system.autoDeploy`; the result is one record per case.
{ libPath, casesJson }:

let
  lib = import (/. + libPath);
  inherit (lib) mkOption types;

  fakeHash = "0000000000000000000000000000000a";
  stubPackage = name: {
    type = "derivation";
    inherit name;
    pname = name;
    outPath = "/nix/store/${fakeHash}-${name}";
  };

  # What package.nix asks of python3Packages; a name missing here fails the
  # evaluation, which is the point: the stub must follow package.nix.
  python3Packages =
    lib.genAttrs [
      "setuptools"
      "requests"
      "prometheus-client"
      "rich"
      "cryptography"
      "pytestCheckHook"
      "pyyaml"
      "hypothesis"
    ] stubPackage
    // {
      buildPythonApplication =
        attrs:
        attrs
        // {
          type = "derivation";
          name = "${attrs.pname}-${attrs.version}";
          outPath = "/nix/store/${fakeHash}-${attrs.pname}-${attrs.version}";
        };
    };

  pkgs = {
    # The real one builds the file with a derivation; a literal store file with
    # the same JSON is what the test needs to read back.
    formats.json =
      { }:
      {
        type = types.anything;
        generate = name: value: builtins.toFile name (builtins.toJSON value);
      };
    coreutils = stubPackage "coreutils";
    gnugrep = stubPackage "gnugrep";
    # A literal store file with the same text, so the test can run the script.
    writeShellScript = name: text: builtins.toFile name "#!/bin/sh\n${text}";
    callPackage = lib.callPackageWith {
      inherit lib python3Packages;
      nix = stubPackage "nix";
      systemd = stubPackage "systemd";
      kexec-tools = stubPackage "kexec-tools";
      runtimeShell = "/nix/store/${fakeHash}-bash/bin/bash";
    };
  };

  # Declarations of the NixOS options module.nix sets or reads, loose enough to
  # accept any value the real ones accept.
  nixosStubs = {
    options = {
      assertions = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      environment.systemPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
      networking.hostName = mkOption {
        type = types.str;
        default = "nixos";
      };
      networking.proxy.envVars = mkOption {
        type = types.attrsOf types.str;
        default = { };
      };
      nix.package = mkOption {
        type = types.package;
        default = stubPackage "nix";
      };
      systemd.package = mkOption {
        type = types.package;
        default = stubPackage "systemd";
      };
      systemd.services = mkOption {
        type = types.attrsOf types.anything;
        default = { };
      };
      systemd.timers = mkOption {
        type = types.attrsOf types.anything;
        default = { };
      };
      systemd.tmpfiles.rules = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      system.activationScripts = mkOption {
        type = types.attrsOf types.anything;
        default = { };
      };
      boot.loader.systemd-boot.enable = mkOption {
        type = types.bool;
        default = false;
      };
      boot.loader.systemd-boot.xbootldrMountPoint = mkOption {
        type = types.nullOr types.str;
        default = null;
      };
      boot.loader.efi.efiSysMountPoint = mkOption {
        type = types.str;
        default = "/boot";
      };
    };
  };

  evalCase =
    settings:
    let
      inherit
        (lib.evalModules {
          modules = [
            ../../module.nix
            nixosStubs
            # A case's `_boot`: the boot loader's configuration (config.boot).
            { system.autoDeploy = builtins.removeAttrs settings [ "_boot" ]; }
            (lib.optionalAttrs (settings ? _boot) { boot = settings._boot; })
          ];
          specialArgs = { inherit pkgs; };
        })
        config
        options
        ;
      package = config.system.autoDeploy.package;
    in
    {
      # Rendering the documentation reads every option's type and description.
      options = map (option: {
        inherit (option) name description type;
        hasExample = option ? example;
      }) (lib.optionAttrSetToDocList options.system.autoDeploy);
      failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
      services = config.systemd.services;
      timers = config.systemd.timers;
      activationScripts = config.system.activationScripts;
      tmpfiles = config.systemd.tmpfiles.rules;
      systemPackages = map toString config.environment.systemPackages;
      package = {
        path = toString package;
        mainProgram = package.meta.mainProgram;
        dependencies = map (p: p.pname) (package.dependencies or [ ]);
        makeWrapperArgs = package.makeWrapperArgs or [ ];
        preCheck = package.preCheck or "";
        postPatch = package.postPatch or "";
        attributes = builtins.attrNames package;
      };
    };
in
map evalCase (builtins.fromJSON casesJson)
