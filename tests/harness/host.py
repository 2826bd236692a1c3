"""A sandbox root standing in for a NixOS host, and the agent run against it."""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .nix import NixBuilder, SigningKey, System, SystemSpec, nix_env_vars, require_tool, run_checked
from .server import TestServer

REPO = Path(__file__).resolve().parents[2]
# Replaced by recorders that log and exit 0: they would reboot the test machine.
RECORDED = ("systemctl", "kexec")
# Wrapped by loggers that then exec the real binary, to count spawns.
COUNTED = ("nix-store", "nix-env", "nix", "systemd-run")
ARG_SEPARATOR = "\x1f"

RECORDER = """#!/bin/sh
line=""
for arg in "$@"; do line="$line$arg\x1f"; done
printf '%s\\n' "$line" >> '{log}'
"""
COUNTER = RECORDER + "exec '{real}' \"$@\"\n"
# A recorded tool fails with the message in <root>/TOOL-fails, or in <root>/TOOL-fails.ARG
# for calls whose first argument is ARG (kexec refused under Secure Boot lockdown: a
# `kexec-fails.--load`; `systemctl kexec` refused: a `systemctl-fails.kexec`).
FAILS = """for fails in '{root}/{name}-fails' "{root}/{name}-fails.$1"; do
  if [ -e "$fails" ]; then cat "$fails" >&2; exit 1; fi
done
"""
# systemd-boot's LoaderInfo EFI variable (attribute bits, then UTF-16): "systemd-boot booted".
LOADER_INFO = "sys/firmware/efi/efivars/LoaderInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
# bootctl as systemd-boot on this root would answer: one entry per profile generation (as
# NixOS's systemd-boot-builder writes them; only the newest N with N in <root>/boot/limit,
# its configurationLimit), the one-time entry kept in <root>/boot/oneshot where the
# firmware would keep it. `bootctl` fails as a recorded tool does (FAILS). With
# <root>/boot/uki, the entries are unified kernel images (Lanzaboote's): no `init=`.
BOOTCTL = (
    RECORDER
    + FAILS
    + """root='{root}'
profiles="$root/nix/var/nix/profiles"
case "$1" in
list)
  limit=$(cat "$root/boot/limit" 2>/dev/null || echo 1000)
  sep=""; printf '['
  numbers=$(ls "$profiles" | sed -n 's/^system-\\([0-9]*\\)-link$/\\1/p' | sort -n)
  for n in $(echo "$numbers" | tail -n "$limit"); do
    if [ -e "$root/boot/uki" ]; then
      printf '%s{{"id":"nixos-generation-%s.efi","type":"type2","options":"loglevel=4"}}' \\
        "$sep" "$n"
    else
      printf '%s{{"id":"nixos-generation-%s.conf","options":"init=%s/init loglevel=4"}}' \\
        "$sep" "$n" "$(readlink "$profiles/system-$n-link")"
    fi
    sep=,
  done
  echo ']' ;;
set-oneshot)
  if [ -z "$2" ]; then rm -f "$root/boot/oneshot"; else echo "$2" > "$root/boot/oneshot"; fi ;;
*) echo "bootctl stand-in: $1 is not modelled" >&2; exit 1 ;;
esac
"""
)


@dataclass(frozen=True)
class AgentResult:
    returncode: int
    stdout: str
    stderr: str
    argv: tuple[str, ...]

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def __str__(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\nexit {self.returncode}\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


def error_lines(result: AgentResult) -> list[str]:
    """The agent's own error lines (tools it runs are prefixed with their name)."""
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def no_traceback(result: AgentResult) -> None:
    """The agent failed, if it did, with its own words, not a Python traceback."""
    assert "Traceback" not in result.stderr, result


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series, parsed with Prometheus' own text parser."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no series {name}{labels} in:\n{text}")


def point_link(link: Path, target: str) -> None:
    """Make `link` -> `target` atomically (temp link + rename), as NixOS does."""
    temporary = link.with_name(link.name + ".tmp-harness")
    if temporary.is_symlink():
        temporary.unlink()
    os.symlink(target, temporary)
    os.replace(temporary, link)


def read_link(link: Path) -> str | None:
    return os.readlink(link) if link.is_symlink() else None


def resolve_link(link: Path) -> str | None:
    """The store path a (possibly chained, e.g. profile) link ends at, or None."""
    if not link.is_symlink():
        return None
    target = link
    for _ in range(40):
        if not target.is_symlink():
            break
        nxt = os.readlink(target)
        target = target.parent / nxt if not os.path.isabs(nxt) else Path(nxt)
    return str(target)


@dataclass
class Host:
    """A test's sandbox host: root, binary cache + server, recorders, the agent."""

    tmp: Path
    builder: NixBuilder
    server: TestServer
    real_tools: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = self.tmp / "root"
        for sub in ("run", "nix/var/nix/profiles", "var/lib/nixos-autodeploy", "boot"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.bin_dir = self.tmp / "bin"
        self.log_dir = self.tmp / "recorded"
        self.gcroots = self.tmp / "gcroots"
        self.home = self.tmp / "home"
        for directory in (self.bin_dir, self.log_dir, self.gcroots, self.home):
            directory.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.tmp / "textfile" / "nixos-autodeploy.prom"
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self._write_recorders()

    # ---- paths -----------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.root / "var/lib/nixos-autodeploy"

    @property
    def current_link(self) -> Path:
        return self.root / "run/current-system"

    @property
    def booted_link(self) -> Path:
        return self.root / "run/booted-system"

    @property
    def upstream_link(self) -> Path:
        return self.root / "run/upstream-system"

    @property
    def profile_link(self) -> Path:
        return self.root / "nix/var/nix/profiles/system"

    @property
    def boot_default_link(self) -> Path:
        return self.root / "boot/default"

    @property
    def url(self) -> str:
        return self.server.url("/upstream")

    def current(self) -> str | None:
        return read_link(self.current_link)

    def booted(self) -> str | None:
        return read_link(self.booted_link)

    def upstream(self) -> str | None:
        return read_link(self.upstream_link)

    def profile(self) -> str | None:
        """Store path the system profile ends at (through its generation link)."""
        return resolve_link(self.profile_link)

    def boot_default(self) -> str | None:
        return read_link(self.boot_default_link)

    def links(self) -> dict[str, str | None]:
        """Everything a rejected input must leave alone, for before/after comparison."""
        return {
            "current": self.current(),
            "booted": self.booted(),
            "upstream": self.upstream(),
            "profile": self.profile(),
            "profile_generation": read_link(self.profile_link),
            "boot_default": self.boot_default(),
        }

    def activations(self) -> list[tuple[str, str]]:
        """(action, store path) per switch-to-configuration run, in order."""
        log = self.root / "activations.log"
        if not log.exists():
            return []
        pairs = [line.split(" ", 1) for line in log.read_text().splitlines() if line]
        return [(action, path) for action, path in pairs]

    # ---- Nix -------------------------------------------------------------

    @property
    def nix_config(self) -> str:
        return (
            f"substituters = {self.server.base_url}\n"
            f"trusted-public-keys = {self.builder.key.public}\n"
            "require-sigs = true\n"
            "narinfo-cache-negative-ttl = 0\n"
            "narinfo-cache-positive-ttl = 0\n"
            "connect-timeout = 5\n"
            "fallback = false\n"
        )

    def nix_env(self) -> dict[str, str]:
        return nix_env_vars(self.nix_config, self.tmp / "xdg-cache")

    def build(self, *specs: SystemSpec, signed: bool = True) -> dict[str, System]:
        return self.builder.build(*specs, signed=signed)

    def build_one(self, name: str = "a", signed: bool = True, **spec: Any) -> System:
        return self.builder.build(SystemSpec(name=name, **spec), signed=signed)[name]

    def store_path_is_valid(self, path: str) -> bool:
        """Whether the real store holds `path` (`nix-store --check-validity`)."""
        checked = subprocess.run(
            ["nix-store", "--check-validity", path], env=self.nix_env(), capture_output=True
        )
        return checked.returncode == 0

    def realise(self, system: System | str) -> str:
        """Substitute `system` from the binary cache into the real store, with a GC root."""
        path = str(system)
        root = self.gcroots / os.path.basename(path)
        # Straight from the cache directory, not over HTTP: the server's request log
        # then holds only what the agent (or the test) asked for.
        env = nix_env_vars(
            f"substituters = file://{self.builder.cache_dir}\n"
            f"trusted-public-keys = {self.builder.key.public}\n"
            "require-sigs = true\n",
            self.tmp / "xdg-cache",
        )
        run_checked(["nix-store", "--realise", path, "--add-root", str(root)], env=env)
        return path

    # ---- situations ------------------------------------------------------

    def install(self, system: System | str) -> None:
        """As if freshly installed: profile, current, booted and boot default -> system."""
        path = self.realise(system)
        self.set_profile(path)
        for link in (self.current_link, self.booted_link, self.boot_default_link):
            point_link(link, path)

    def set_profile(self, system: System | str) -> None:
        run_checked(
            ["nix-env", "--profile", str(self.profile_link), "--set", str(system)],
            env=self.nix_env(),
        )

    def deploy_by_hand(self, system: System | str, action: str = "switch") -> None:
        """What `nixos-rebuild ACTION` does: profile (unless test), then its activation."""
        path = self.realise(system)
        if action != "test":
            self.set_profile(path)
        run_checked([f"{path}/bin/switch-to-configuration", action], env=self.agent_env())

    def switch_by_hand(self, system: System | str) -> None:
        """`switch-to-configuration switch` alone, without touching the profile (as colmena's
        `apply-local` or a hand-run activation does)."""
        path = self.realise(system)
        run_checked([f"{path}/bin/switch-to-configuration", "switch"], env=self.agent_env())

    def update_published(
        self, old: str = "old", new: str = "new", *, collect: bool = True
    ) -> tuple[System, System]:
        """Builds `old` and `new`: the host runs old, which the agent deployed; CI
        published new; and, with collect, the collector has seen it."""
        systems = self.build(SystemSpec(old), SystemSpec(new))
        installed, published = systems[old], systems[new]
        self.install(installed)
        self.write_deployed(installed)
        self.publish(published)
        if collect:
            assert self.collect().returncode == 0
        return installed, published

    def use_systemd_boot(self) -> None:
        """From now on systemd-boot boots this host: its EFI variable, `bootctl`."""
        info = self.root / LOADER_INFO
        info.parent.mkdir(parents=True, exist_ok=True)
        info.write_bytes(b"\x06\0\0\0" + "systemd-boot 252\0".encode("utf-16-le"))
        log = self.log_dir / "bootctl.log"
        self._write_script("bootctl", BOOTCTL.format(log=log, root=self.root, name="bootctl"))

    @property
    def oneshot_path(self) -> Path:
        return self.root / "boot/oneshot"

    def reboot(self) -> None:
        """Boot what the boot loader points at: systemd-boot's one-time entry (used up by
        this boot, whether the system comes up or not), else the default. /run is a tmpfs,
        so it starts empty."""
        target = self.boot_default()
        if self.oneshot_path.exists():
            entry = self.oneshot_path.read_text().strip()
            self.oneshot_path.unlink()
            generation = entry.removeprefix("nixos-generation-").removesuffix(".conf")
            target = resolve_link(self.profile_link.with_name(f"system-{generation}-link"))
        assert target is not None, "nothing to boot: <root>/boot/default is missing"
        shutil.rmtree(self.root / "run")
        (self.root / "run").mkdir()
        point_link(self.booted_link, target)
        point_link(self.current_link, target)

    def kexec_into(self, system: System | str) -> None:
        """A kexec into system: it boots, the boot loader's default stays as it was."""
        shutil.rmtree(self.root / "run")
        (self.root / "run").mkdir()
        point_link(self.booted_link, str(system))
        point_link(self.current_link, str(system))

    def publish(self, system: System | str, path: str = "/upstream") -> None:
        """CI publishes `system`: the upstream URL answers its store path + newline."""
        self.server.publish_body((str(system) + "\n").encode(), path)

    def sign_release(self, *args: str) -> bytes:
        """CI's `nixos-autodeploy publish ARGS`: the release it wrote, not yet served."""
        out = self.tmp / "release.json"
        result = self.run_agent("publish", *args, "-o", str(out), root=False)
        assert result.returncode == 0, result
        return out.read_bytes()

    def fail_activation(self, system: System | str, message: str = "activation failed") -> None:
        """system's switch-to-configuration fails at once, changing nothing."""
        (self.root / "fail-activation").write_text(f"{system}\n{message}")

    def fail_activation_late(self, system: System | str, message: str = "unit failed") -> None:
        """system's switch-to-configuration fails like NixOS's when a unit does not start:
        after switching the links and the boot loader, with exit code 4."""
        (self.root / "fail-activation-late").write_text(f"{system}\n{message}")

    def slow_activation(self, seconds: float) -> None:
        (self.root / "slow-activation").write_text(str(seconds))

    @contextmanager
    def lock_held(self) -> Iterator[None]:
        """Hold the state dir's lock with flock(1) from another process."""
        flock = require_tool("flock")
        lock = self.state_dir / "lock"
        holder = subprocess.Popen(
            # --no-fork: one process holds the lock, so reaping it means the lock is free
            # (a forked child could still be dying, holding it, after flock was reaped).
            [
                flock,
                "--no-fork",
                "--exclusive",
                str(lock),
                "sh",
                "-c",
                "echo locked; exec sleep 3600",
            ],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "locked"
            yield
        finally:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()

    # ---- state files -----------------------------------------------------

    def read_json(self, name: str) -> Any:
        return json.loads((self.state_dir / name).read_text())

    def write_deployed(
        self,
        system: System | str,
        mode: str = "switch",
        previous: System | str | None = None,
        at: float = 1_700_000_000.0,
    ) -> None:
        """The deployed record as the actuator writes it (docs/CONTRACT.md)."""
        record = {
            "version": 1,
            "path": str(system),
            "mode": mode,
            "previous": None if previous is None else str(previous),
            "at": at,
            "reboot_issued_at": None,
        }
        (self.state_dir / "deployed.json").write_text(json.dumps(record))

    def snapshot(self) -> Any:
        return self.read_json("snapshot.json")

    def metrics(self) -> str:
        return self.metrics_path.read_text()

    # ---- recorders -------------------------------------------------------

    def _write_recorders(self) -> None:
        for name in RECORDED:
            script = RECORDER + FAILS
            self._write_script(
                name, script.format(log=self.log_dir / f"{name}.log", root=self.root, name=name)
            )
        for name in COUNTED:
            real = shutil.which(name)
            if real is None:
                continue
            self.real_tools[name] = real
            self._write_script(name, COUNTER.format(log=self.log_dir / f"{name}.log", real=real))

    def _write_script(self, name: str, text: str) -> None:
        script = self.bin_dir / name
        script.write_text(text)
        script.chmod(0o755)

    def recorded(self, name: str) -> list[list[str]]:
        """argv (without the command) of each call of a recorded or counted tool."""
        log = self.log_dir / f"{name}.log"
        if not log.exists():
            return []
        return [line.split(ARG_SEPARATOR)[:-1] for line in log.read_text().splitlines()]

    def spawn_count(self, *names: str) -> int:
        return sum(len(self.recorded(name)) for name in names)

    # ---- the agent -------------------------------------------------------

    def agent_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = self.nix_env()
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["HOME"] = str(self.home)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.pop("NETRC", None)
        env.update(extra or {})
        return env

    def agent_argv(self, *args: str, root: bool = True) -> list[str]:
        """`nixos-autodeploy ARGS` (`--root` inserted after the subcommand)."""
        argv: list[str] = [sys.executable, "-m", "collector.cli"]
        if args:
            argv.append(args[0])
            if root:
                argv += ["--root", str(self.root)]
            argv += args[1:]
        return argv

    def on_a_terminal(
        self, *args: str, env: Mapping[str, str] | None = None, columns: int = 160
    ) -> tuple[int, bytes]:
        """The agent with stdout and stderr on a pseudo-terminal: its exit status and all it
        wrote there. NO_COLOR is dropped unless `env` sets it."""
        main, secondary = pty.openpty()
        full_env = {**self.agent_env(env), "TERM": "xterm-256color", "COLUMNS": str(columns)}
        if env is None or "NO_COLOR" not in env:
            full_env.pop("NO_COLOR", None)
        with subprocess.Popen(
            self.agent_argv(*args), env=full_env, stdout=secondary, stderr=secondary, cwd=self.tmp
        ) as proc:
            os.close(secondary)
            output = b""
            while True:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not chunk:
                    break
                output += chunk
        os.close(main)
        return proc.returncode, output

    def start_agent(
        self, *args: str, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[str]:
        """The agent in the background, in a session of its own so a test can kill it the
        way systemd stops a unit: the agent and everything it started."""
        return subprocess.Popen(
            self.agent_argv(*args),
            env=self.agent_env(env),
            cwd=self.tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def run_agent(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        root: bool = True,
        timeout: float = 300,
    ) -> AgentResult:
        """Run `nixos-autodeploy ARGS` (`--root` inserted after the subcommand)."""
        argv = self.agent_argv(*args, root=root)
        completed = subprocess.run(
            argv,
            env=self.agent_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,  # a safety net, not an assertion
            cwd=self.tmp,
        )
        return AgentResult(completed.returncode, completed.stdout, completed.stderr, tuple(argv))

    def collect(self, *args: str, url: str | None = None, timeout: float = 30) -> AgentResult:
        """`collect` against this host's server and metrics file; extra `args` appended."""
        return self.run_agent(
            "collect",
            "--url",
            url or self.url,
            "--prometheus-path",
            str(self.metrics_path),
            "--timeout",
            str(timeout),
            *args,
        )

    def status(self, *args: str) -> AgentResult:
        return self.run_agent("status", *args)


@contextmanager
def standalone_host(work: Path, key_name: str) -> Iterator[Host]:
    """A Host outside pytest (the demo, the benchmark): its own chroot store, signing key,
    binary cache and server under `work`; the server stops on the way out."""
    (work / "cache").mkdir(parents=True)
    (work / "key").mkdir()
    server = TestServer(cache_dir=work / "cache")
    server.start()
    try:
        builder = NixBuilder(
            build_store=work / "build-store",
            cache_dir=work / "cache",
            key=SigningKey.generate(work / "key", key_name),
            root=work / "root",
            salt=uuid.uuid4().hex[:12],
            cache_home=work / "xdg-cache",
        )
        yield Host(tmp=work, builder=builder, server=server)
    finally:
        server.stop()


@contextmanager
def sandbox_fleet(
    tmp: Path, build_store: Path, key: SigningKey, names: tuple[str, ...]
) -> Iterator[list[Host]]:
    """Sandbox hosts sharing one build store, key and salt (so the same systems), each with
    its own root, binary cache and server under tmp/NAME; the servers stop on the way out."""
    for tool in ("nix-store", "nix-env", "nix"):
        require_tool(tool)
    salt = uuid.uuid4().hex[:12]
    servers: list[TestServer] = []
    try:
        hosts = []
        for name in names:
            (tmp / name / "cache").mkdir(parents=True)
            server = TestServer(cache_dir=tmp / name / "cache")
            server.start()
            servers.append(server)
            builder = NixBuilder(
                build_store=build_store,
                cache_dir=tmp / name / "cache",
                key=key,
                root=tmp / name / "root",
                salt=salt,
                cache_home=tmp / name / "xdg-cache",
            )
            hosts.append(Host(tmp=tmp / name, builder=builder, server=server))
        yield hosts
    finally:
        for server in servers:
            server.stop()
