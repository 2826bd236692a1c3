# Evaluates ../../flake.nix's outputs against a stand-in nixpkgs input (the real
# lib, stub package sets) and reports their shape, for tests/test_nix_files.py.
# Only attribute names are read, so nothing is built or fetched.
{ libPath }:

let
  lib = import (/. + libPath);
  flake = import ../../flake.nix;
  systems = [
    "x86_64-linux"
    "aarch64-linux"
  ];

  stubPkgs = system: {
    stdenv.hostPlatform.system = system;
    callPackage = _fn: _args: {
      type = "derivation";
      name = "nixos-autodeploy";
    };
  };
  nixpkgs = {
    inherit lib;
    legacyPackages = lib.genAttrs systems stubPkgs;
  };

  self = flake.outputs { inherit self nixpkgs; };
in
{
  inputs = builtins.attrNames flake.inputs;
  outputs = builtins.attrNames self;
  modules = builtins.mapAttrs (_: module: module == ../../module.nix) self.nixosModules;
  systems = lib.genAttrs systems (system: {
    packages = builtins.attrNames self.packages.${system};
    checks = builtins.attrNames self.checks.${system};
    devShells = builtins.attrNames self.devShells.${system};
  });
  formatterSystems = builtins.attrNames self.formatter;
  overlayPackage = lib.concatStrings (builtins.attrNames (self.overlays.default (stubPkgs "x86_64-linux") { }));
}
