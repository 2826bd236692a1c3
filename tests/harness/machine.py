"""An in-process stand-in for the commands the actuator runs, for fast tests of its state
machine and its reboot room: `process.run` is replaced in every actuator module and the
commands' effects on a sandbox root are played here (the profile's generations, the running
system, the boot loader's default and one-time entry). Systems live in a store of the
test's own (NIX_STORE_DIR). The real-Nix tests run the same code against real Nix."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import actuator
from collector import process
from collector.errors import ProcessError
from collector.process import Result

Effect = Callable[[list[str]], str]


@dataclass
class Machine:
    """root: the sandbox root; store: the test's store dir. `ran` lists every argv."""

    root: Path
    store: Path
    ran: list[list[str]] = field(default_factory=list)
    failing: dict[str, str] = field(default_factory=dict)  # argv prefix -> error message
    oneshot: str | None = None  # systemd-boot's one-time entry
    limit: int | None = None  # systemd-boot's configurationLimit: entries of the newest only

    def system(self, name: str, kernel: str = "6.1") -> str:
        """A system in the store: switch-to-configuration (never run: its effect is played
        here), kernel, initrd, kernel-modules and kernel-params."""
        path = self.store / f"{name[0] * 32}-nixos-system-{name}"
        (path / "bin").mkdir(parents=True, exist_ok=True)
        switch = path / "bin/switch-to-configuration"
        switch.write_text("#!/bin/sh\nexit 1\n")
        switch.chmod(0o755)
        for part in ("kernel", "initrd", "kernel-modules"):
            target = self.store / f"{'k' * 31}{kernel[-1]}-{part}-{kernel}"
            target.mkdir(exist_ok=True)
            if not (path / part).is_symlink():
                os.symlink(target, path / part)
        (path / "kernel-params").write_text(f"loglevel=4 system={name}\n")
        return str(path)

    # ---- the host's links ------------------------------------------------------------

    @property
    def profiles(self) -> Path:
        return self.root / "nix/var/nix/profiles"

    def link(self, name: str) -> str | None:
        path = self.root / name
        return os.readlink(path) if path.is_symlink() else None

    def point(self, name: str, target: str) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        os.symlink(target, path)

    def install(self, system: str) -> None:
        """Freshly installed: profile generation 1, current, booted and boot default."""
        self._set_profile(system)
        for name in ("run/current-system", "run/booted-system", "boot/default"):
            self.point(name, system)

    def generations(self) -> dict[int, str]:
        found = {}
        for entry in self.profiles.glob("system-*-link"):
            found[int(entry.name.split("-")[1])] = os.readlink(entry)
        return found

    def profile(self) -> str | None:
        generation = self.link("nix/var/nix/profiles/system")
        return None if generation is None else os.readlink(self.profiles / generation)

    def boot(self, system: str) -> None:
        """The machine comes up on system: /run starts empty."""
        for entry in (self.root / "run").rglob("*"):
            if entry.is_symlink() or entry.is_file():
                entry.unlink()
        self.point("run/current-system", system)
        self.point("run/booted-system", system)

    # ---- the commands' effects -------------------------------------------------------

    def _set_profile(self, system: str) -> None:
        generations = self.generations()
        newest = max(generations, default=0)
        # As nix-env: the newest generation is reused when it already names system.
        number = newest if generations.get(newest) == system else newest + 1
        self.point(f"nix/var/nix/profiles/system-{number}-link", system)
        self.point("nix/var/nix/profiles/system", f"system-{number}-link")

    def _nix_env(self, argv: list[str]) -> str:
        action, *args = argv[3:]
        if action == "--set":
            self._set_profile(args[0])
        elif action == "--switch-generation":
            self.point("nix/var/nix/profiles/system", f"system-{args[0]}-link")
        elif action == "--delete-generations":
            for number in args:
                (self.profiles / f"system-{number}-link").unlink()
        return ""

    def _switch(self, argv: list[str]) -> str:
        if argv[0] == "systemd-run":
            argv = argv[argv.index("--") + 1 :]
        system, action = argv[0].removesuffix("/bin/switch-to-configuration"), argv[1]
        if action in ("switch", "boot"):
            self.point("boot/default", system)
        if action in ("switch", "test"):
            self.point("run/current-system", system)
        return ""

    def _bootctl(self, argv: list[str]) -> str:
        if argv[1] == "list":
            kept = sorted(self.generations().items())[-(self.limit or 0) :]
            entries = [
                f'{{"id": "nixos-generation-{n}.conf", "options": "init={p}/init"}}'
                for n, p in kept
            ]
            return "[" + ", ".join(entries) + "]"
        self.oneshot = argv[2] or None
        return ""

    def _realise(self, argv: list[str]) -> str:
        self.point(os.path.relpath(argv[4], self.root), argv[2])
        return ""

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        env: object = None,
        stream_stderr: bool = False,
    ) -> Result:
        args = list(argv)
        self.ran.append(args)
        for prefix, message in self.failing.items():
            if " ".join(args).startswith(prefix):
                if check:
                    raise ProcessError(args, 1, message)
                return Result(args, 1, "", message)
        effects: dict[str, Effect] = {
            "nix-env": self._nix_env,
            "bootctl": self._bootctl,
            "nix-store": self._realise,
            "systemctl": lambda a: "",
            "kexec": lambda a: "",
        }
        effect = effects.get(os.path.basename(args[0]), self._switch)
        return Result(args, 0, effect(args), "")

    def commands(self) -> list[str]:
        """What ran, one line each, store paths by their system's name."""
        lines = []
        for argv in self.ran:
            line = " ".join(argv).replace(str(self.root), "<root>")
            for system in self.store.glob("*-nixos-system-*"):
                line = line.replace(str(system), system.name.split("-nixos-system-")[1])
            lines.append(line)
        return lines


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Machine]:
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("NIX_STORE_DIR", str(store))
    fake = Machine(root=tmp_path / "root", store=store)
    for sub in ("run", "boot", "nix/var/nix/profiles", "var/lib/nixos-autodeploy"):
        (fake.root / sub).mkdir(parents=True, exist_ok=True)
    for name, module in list(sys.modules.items()):
        on_the_host = name.startswith(f"{actuator.__name__}.") or name == "collector.nix"
        if on_the_host and getattr(module, "run", None) is process.run:
            monkeypatch.setattr(module, "run", fake.run)
    yield fake
