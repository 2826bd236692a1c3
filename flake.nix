{
  description = "nixos-autodeploy: keep NixOS hosts on the system their CI published, monitoring first";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # Source for the lint check: the Python code and its configuration only.
      lintSource = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.unions [
          ./pyproject.toml
          ./collector
          ./actuator
          ./tests
          (lib.fileset.maybeMissing ./benchmarks)
        ];
      };
    in
    {
      nixosModules = {
        nixos-autodeploy = ./module.nix;
        default = self.nixosModules.nixos-autodeploy;
      };

      overlays.default = final: _prev: {
        nixos-autodeploy = final.callPackage ./package.nix { };
      };

      packages = forAllSystems (pkgs: {
        nixos-autodeploy = pkgs.callPackage ./package.nix { };
        default = self.packages.${pkgs.stdenv.hostPlatform.system}.nixos-autodeploy;
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.default ];
          packages = [
            pkgs.ruff
            pkgs.nix
            pkgs.prometheus
            pkgs.prometheus-node-exporter
            (pkgs.python3.withPackages (ps: [
              ps.mypy
              ps.pytest
              ps.hypothesis
              ps.pyyaml
              ps.types-requests
              ps.types-pyyaml
            ]))
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-tree);

      checks = forAllSystems (
        pkgs:
        let
          python = pkgs.python3.withPackages (ps: [
            ps.requests
            ps.prometheus-client
            ps.rich
            ps.cryptography
            ps.pytest
            ps.hypothesis
            ps.pyyaml
            ps.mypy
            ps.types-requests
            ps.types-pyyaml
          ]);
        in
        {
          package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;

          vm = import ./test.nix {
            inherit pkgs;
            module = self.nixosModules.default;
          };

          lint =
            pkgs.runCommand "nixos-autodeploy-lint"
              {
                nativeBuildInputs = [
                  pkgs.ruff
                  python
                ];
              }
              ''
                cp -r ${lintSource} src
                chmod -R u+w src
                cd src
                ruff check --no-cache .
                ruff format --check --no-cache .
                # Files and strictness come from [tool.mypy] in pyproject.toml.
                mypy --strict --cache-dir "$TMPDIR/mypy"
                touch $out
              '';
        }
      );
    };
}
