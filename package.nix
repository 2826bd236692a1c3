{
  lib,
  python3Packages,
  nix,
  systemd,
  kexec-tools,
}:

let
  pyproject = lib.importTOML ./pyproject.toml;
in
python3Packages.buildPythonApplication {
  pname = "nixos-autodeploy";
  inherit (pyproject.project) version;
  pyproject = true;

  # Only what the wheel and its unit tests need, so editing the Nix files or
  # dashboards does not rebuild the package.
  src = lib.fileset.toSource {
    root = ./.;
    fileset = lib.fileset.unions [
      ./pyproject.toml
      ./collector
      ./actuator
      ./tests
      # tests/test_nix_files.py compares its dependencies with pyproject.toml.
      ./package.nix
      (lib.fileset.maybeMissing ./README.md)
      (lib.fileset.maybeMissing ./LICENSE)
    ];
  };

  build-system = [ python3Packages.setuptools ];

  # Keep in sync with [project].dependencies in pyproject.toml (a test checks it).
  dependencies = with python3Packages; [
    requests
    prometheus-client
    rich
  ];

  # The agent runs nix-store, nix-env, systemd-run, systemctl and kexec.
  makeWrapperArgs = [
    "--prefix"
    "PATH"
    ":"
    (lib.makeBinPath [
      nix
      systemd
      kexec-tools
    ])
  ];

  nativeCheckInputs = with python3Packages; [
    pytestCheckHook
    pyyaml
  ];

  # Tests with these markers need a real Nix store and daemon, Prometheus or a
  # qemu guest, none of which the build sandbox has; the rest are unit tests.
  disabledTestMarks = [
    "nix"
    "prometheus"
    "guest"
  ];

  pythonImportsCheck = [
    "collector"
    "actuator"
  ];

  meta = {
    description = "Pull-model NixOS deployment agent: keeps hosts on the system their CI published, monitoring first";
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
    mainProgram = "nixos-autodeploy";
  };
}
