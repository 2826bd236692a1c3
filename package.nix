{
  lib,
  python3Packages,
  nix,
  systemd,
  kexec-tools,
  runtimeShell,
}:

let
  pyproject = lib.importTOML ./pyproject.toml;
in
python3Packages.buildPythonApplication {
  pname = "nixos-autodeploy";
  inherit (pyproject.project) version;
  pyproject = true;

  # Only what the wheel and its unit tests need, so editing the other Nix files,
  # the scripts or the docs does not rebuild the package.
  src = lib.fileset.toSource {
    root = ./.;
    fileset = lib.fileset.unions [
      ./pyproject.toml
      ./collector
      ./actuator
      ./tests
      # tests/test_nix_files.py compares its dependencies with pyproject.toml.
      ./package.nix
      # tests/test_grafana.py (unmarked, so it runs in the check phase) reads the dashboards.
      ./grafana
      # tests/test_transaction.py checks the contract's phase table against the code.
      ./docs
      (lib.fileset.maybeMissing ./README.md)
      (lib.fileset.maybeMissing ./LICENSE)
    ];
  };

  # Health check commands run with an absolute shell: a NixOS unit's PATH has none.
  postPatch = ''
    substituteInPlace actuator/health.py \
      --replace 'SHELL = "/bin/sh"' 'SHELL = "${runtimeShell}"'
  '';

  build-system = [ python3Packages.setuptools ];

  # Keep in sync with [project].dependencies in pyproject.toml (a test checks it).
  dependencies = with python3Packages; [
    requests
    prometheus-client
    rich
    cryptography
  ];

  # The agent runs nix-store, nix-env, systemd-run, systemctl, bootctl and kexec.
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
    # Imported by test modules that are collected, then deselected by their marks.
    pyyaml
    hypothesis
  ];

  # Tests with these markers (pyproject.toml's [tool.pytest.ini_options] markers; a
  # test checks the two agree) need a real Nix store and daemon, Prometheus, a qemu
  # guest or a fresh Debian chroot, none of which the build sandbox has; the rest run in the check phase.
  # PYTEST_ADDOPTS, not pytestCheckHook's disabledTestMarks: pytest reads it whatever
  # hook a nixpkgs release has (disabledTestMarks is missing from the older ones).
  preCheck = ''
    export PYTEST_ADDOPTS="-m 'not nix and not prometheus and not guest and not fresh'"
  '';

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
