"""Real Nix for the tests: synthetic systems, a signed binary cache, NIX_CONFIG."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from collector.store import StorePath

SYSTEM_NIX = Path(__file__).with_name("system.nix")
# Builders in the chroot store see only these host paths (for /bin/sh & coreutils).
SANDBOX_PATHS = "/bin /usr /lib /lib64"
NIX_COMMAND = ("--extra-experimental-features", "nix-command")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]*$")
# Nix's store path name characters; the harness keeps a name from starting with a dot.
_STORE_NAME_RE = re.compile(r"^[0-9A-Za-z+_?=-][0-9A-Za-z+._?=-]{0,150}$")


def require(condition: bool, message: str) -> None:
    """A missing prerequisite fails the test in CI (which provides it) and skips it elsewhere."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(message + " (CI installs it, so this is an error)")
    pytest.skip(message)


def require_tool(name: str) -> str:
    """Path of `name` on PATH; missing fails the test in CI and skips it elsewhere."""
    found = shutil.which(name)
    require(found is not None, f"required tool {name!r} is not on PATH")
    assert found is not None
    return found


def run_checked(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    input_text: str | None = None,
    timeout: float = 300,
) -> str:
    """Run a helper command; on failure raise with its stderr so the test says why."""
    completed = subprocess.run(
        list(argv),
        env=dict(env) if env is not None else None,
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {completed.returncode}:\n{completed.stderr}")
    return completed.stdout


@dataclass(frozen=True)
class Package:
    """A store path in a system's closure, named `name-version` (or `name` without a
    version). Another `build` of the same name and version is another store path: a rebuild."""

    name: str
    version: str | None = None
    build: str = ""

    @property
    def store_name(self) -> str:
        return self.name if self.version is None else f"{self.name}-{self.version}"

    def to_json(self) -> dict[str, str]:
        if not _STORE_NAME_RE.match(self.store_name):
            raise ValueError(f"not usable as a store path name: {self.store_name!r}")
        return {"name": self.store_name, "build": self.build}


# A kernel other than SystemSpec's default: a system with it needs a reboot to run.
NEW_KERNEL = "6.6.1"


@dataclass(frozen=True)
class SystemSpec:
    """What to build. Same `kernel` (and `initrd`) => same kernel store paths."""

    name: str
    kernel: str = "6.1.0"
    initrd: str | None = None  # defaults to the kernel version
    tag: str | None = None  # kernel-params autodeploy=<tag>, nixos-version; defaults to name
    extra: str = ""  # content of the non-kernel file `extra`
    nixos: bool = True  # False: no bin/switch-to-configuration
    packages: tuple[Package, ...] = ()  # more store paths in its closure
    initrd_secrets: bool = False  # boot.initrd.secrets set: an `append-initrd-secrets`

    def to_json(self) -> dict[str, Any]:
        for value in (self.name, self.kernel, self.initrd or self.kernel, self.tag or self.name):
            if not _VERSION_RE.match(value):
                raise ValueError(f"not usable in a store path name: {value!r}")
        return {
            "name": self.name,
            "kernel": self.kernel,
            "initrd": self.initrd or self.kernel,
            "tag": self.tag or self.name,
            "extra": self.extra,
            "nixos": "1" if self.nixos else "",
            "packages": [p.to_json() for p in self.packages],
            "initrdSecrets": "1" if self.initrd_secrets else "",
        }


@dataclass(frozen=True)
class System:
    """A built synthetic system: `path` is its /nix/store output."""

    spec: SystemSpec
    path: str
    signed: bool

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def basename(self) -> str:
        return os.path.basename(self.path)

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class SigningKey:
    name: str
    secret_file: Path
    public: str  # "name:base64"

    @classmethod
    def generate(cls, directory: Path, name: str) -> SigningKey:
        require_tool("nix-store")
        secret, public = directory / "secret-key", directory / "public-key"
        run_checked(["nix-store", "--generate-binary-cache-key", name, str(secret), str(public)])
        return cls(name=name, secret_file=secret, public=public.read_text().strip())


def nix_env_vars(nix_config: str, cache_home: Path) -> dict[str, str]:
    """Environment for a Nix process: our config on top of /etc/nix, own narinfo cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    env["NIX_CONFIG"] = nix_config
    # Nix caches narinfo lookups per user; keep them per test.
    env["XDG_CACHE_HOME"] = str(cache_home)
    return env


@dataclass
class NixBuilder:
    """Builds systems in a chroot store and copies them into a file:// binary cache."""

    build_store: Path  # chroot store (`nix-build --store DIR`)
    cache_dir: Path  # the binary cache the HTTP server serves
    key: SigningKey
    root: Path  # sandbox root baked into switch-to-configuration
    salt: str
    cache_home: Path

    def _env(self) -> dict[str, str]:
        # No substituters while building: the chroot store must not go online.
        return nix_env_vars("substituters =\n", self.cache_home)

    def build(self, *specs: SystemSpec, signed: bool = True) -> dict[str, System]:
        """Build all `specs` in ONE nix-build call and copy their closures to the cache.

        Unsigned systems get their own salt so no path of their closure is
        shared with (and already signed by) a signed system.
        """
        require_tool("nix-build")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate system names: {names}")
        salt = self.salt if signed else self.salt + "-unsigned"
        spec_json = json.dumps(
            {"root": str(self.root), "salt": salt, "systems": [s.to_json() for s in specs]}
        )
        argv = [
            "nix-build",
            "--store",
            str(self.build_store),
            "--option",
            "sandbox-paths",
            SANDBOX_PATHS,
            "--no-out-link",
            "--quiet",
            str(SYSTEM_NIX),
            "--argstr",
            "specJSON",
            spec_json,
        ]
        for name in names:
            argv += ["-A", name]
        paths = run_checked(argv, env=self._env()).split()
        if len(paths) != len(specs):
            raise RuntimeError(f"nix-build printed {paths} for {names}")
        self.copy_to_cache(paths, signed=signed)
        return {
            spec.name: System(spec=spec, path=path, signed=signed)
            for spec, path in zip(specs, paths, strict=True)
        }

    def copy_to_cache(self, paths: Sequence[str], signed: bool) -> None:
        target = f"file://{self.cache_dir}"
        if signed:
            target += f"?secret-key={self.key.secret_file}"
        run_checked(
            ["nix", *NIX_COMMAND, "copy", "--from", str(self.build_store), "--to", target, *paths],
            env=self._env(),
        )


BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"  # Nix's hash alphabet (no e, o, t, u)


def store_paths(*names: str) -> list[str]:
    """Made-up store paths, a hash per name; a build after `#` changes only the hash."""
    out = []
    for name in names:
        digest = hashlib.sha256(name.encode()).digest()
        hash_part = "".join(BASE32[b % 32] for b in digest)
        out.append(f"/nix/store/{hash_part}-{name.partition('#')[0]}")
    return out


def system_path(name: str) -> StorePath:
    """A made-up system's store path: `name` repeated as its hash, `nixos-system-NAME`."""
    return StorePath(f"/nix/store/{name * 32}-nixos-system-{name}")


def register_closure(store: Path, top: str, paths: Sequence[str], size: int = 1000) -> None:
    """Register top, referring to paths, in a chroot store's database only (`nix-store
    --load-db`, as Nix's installer does): with NIX_REMOTE=store, Nix answers queries about
    closures of any size in seconds, without their contents."""
    lines = []
    for path in paths:
        lines += [path, "0" * 64, str(size), "", "0"]
    lines += [top, "0" * 64, str(size), "", str(len(paths)), *paths]
    run_checked(
        ["nix-store", "--store", str(store), "--load-db"], input_text="\n".join(lines) + "\n"
    )
