"""The README's two commands on a bare Debian 12: what a new user runs, proven.

A clean clone on a machine that ran the suite before is not a bare machine (groups,
packages, caches hide missing install steps). So: debootstrap a minimal Debian 12 from
the mirror apt's sources name (as the guest test does), cached in .cache/fresh/ as a
tarball keyed by what built it; unpack it, copy in the repository's tracked files and
what this machine was given for reaching the package registries (resolv.conf, pip's
machine-wide config files, the PIP_* variables and the files they name such as the CA
bundle, the local CA certificates that bundle is made from), and nothing else: not the
outer venv, /nix or nix.conf. Then, as root in a chroot with /proc, /sys and /dev mounted
and a PID namespace of its own, run the README's first-screen commands word for word: the
demo, then the test command limited to one real-Nix module. The chroot's system users get
uids this machine does not use (see SYSTEM_UIDS); otherwise it is Debian as installed.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import require, run_checked

pytestmark = pytest.mark.fresh

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "fresh"
# What the base is built with; the cached tarball is keyed by it.
DEBOOTSTRAP = ("--variant=minbase", "bookworm")
PROJECT = "/root/nixos-autodeploy"
# Bounds the inner test run: one module that builds and realises with real Nix.
TEST_LIMIT = "-m 'not guest and not fresh' tests/test_collect.py"
DEMO_STATES = ["untracked", "up-to-date", "update-available", "up-to-date"]
# pip's machine-wide config files (site-wide, then XDG); PIP_CONFIG_FILE may add one.
PIP_CONFIG_FILES = ("/etc/pip.conf", "/etc/xdg/pip/pip.conf")
NIX_SHOW_CONFIG = "nix --extra-experimental-features nix-command show-config"
LOCAL_CAS = "/usr/local/share/ca-certificates"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy")
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STEP_TIMEOUT_SECONDS = 2400
# The chroot shares this machine's kernel, and Nix kills every process of a build user's
# uid before it builds: the chroot's system users (useradd --system: Nix's build users)
# get uids no user of this machine has, so neither side kills the other's builds.
SYSTEM_UIDS = (590000, 590999)
# What setup.sh may change, compared across its second run (relative to the chroot).
SETUP_TOUCHES = ("etc", "usr/sbin", "var/lib/dpkg", "var/lib/apt/lists", "nix", "var/empty")


def readme_commands() -> list[str]:
    """The commands of the README's first code block, comments stripped."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"^```sh\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert block, "README.md has no ```sh block"
    lines = (line.split("#", 1)[0].strip() for line in block.group(1).splitlines())
    return [line for line in lines if line]


def host_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources), as the
    guest image's builder finds it; GUEST_MIRROR overrides it for both."""
    if os.environ.get("GUEST_MIRROR"):
        return os.environ["GUEST_MIRROR"]
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.exists():
        for fields in (line.split() for line in deb822.read_text().splitlines()):
            if fields[:1] == ["URIs:"]:
                return fields[1]
    one_line = Path("/etc/apt/sources.list")
    if one_line.exists():
        for line in one_line.read_text().splitlines():
            fields = line.split()
            if fields[:1] == ["deb"] and "security" not in line:
                return fields[2] if fields[1].startswith("[") else fields[1]
    pytest.fail("no Debian mirror in apt's sources; set GUEST_MIRROR")


def mounts_below(root: Path) -> list[Path]:
    """Mount points at or below `root`, innermost (latest) first."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with spaces and the like escaped as octal.
        point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]))
        if point == root or root in point.parents:
            found.append(point)
    return found[::-1]


def unmount_below(root: Path) -> None:
    for point in mounts_below(root):
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(point)], capture_output=True)
    left = mounts_below(root)
    if left:
        raise RuntimeError(f"still mounted: {left}")


def remove_tree(root: Path) -> None:
    """Unmount first: removing through a bind of /dev would remove the machine's devices."""
    unmount_below(root)
    run_checked(["rm", "-rf", "--one-file-system", str(root)])


def base_tarball() -> Path:
    """The bootstrapped Debian 12, built when missing; older ones are removed."""
    key = hashlib.sha256(" ".join(DEBOOTSTRAP).encode()).hexdigest()[:16]
    tarball = CACHE / f"debootstrap-{key}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix="build.", dir=CACHE))
    try:
        started = time.monotonic()
        root = str(build / "root")
        run_checked(["debootstrap", *DEBOOTSTRAP, root, host_mirror()], timeout=1800)
        run_checked(["chroot", root, "apt-get", "clean"])
        run_checked(["tar", "--numeric-owner", "-C", root, "-cf", str(build / "t"), "."])
        for stale in CACHE.glob("debootstrap-*.tar"):
            stale.unlink()
        (build / "t").rename(tarball)
        print(f"fresh base bootstrapped in {time.monotonic() - started:.0f} s")
    finally:
        remove_tree(build)
    return tarball


def registry_files() -> list[Path]:
    """pip's machine-wide config files, the files they or PIP_* variables name, and the
    machine's own CA certificates: installing ca-certificates in the chroot rebuilds the
    bundle they name from those (without them, pip fails behind an intercepting proxy)."""
    names = [*PIP_CONFIG_FILES, os.environ.get("PIP_CONFIG_FILE", "")]
    configs = [Path(name) for name in names if name and Path(name).is_file()]
    values = [value for key, value in os.environ.items() if key.startswith("PIP_")]
    for config in configs:
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(config)
        values += [value for section in parser.sections() for value in parser[section].values()]
    named = {
        Path(word)
        for value in values
        for word in value.split()
        if word.startswith("/") and Path(word).is_file()
    }
    local_cas = {path for path in Path(LOCAL_CAS).rglob("*") if path.is_file()}
    return sorted(set(configs) | named | local_cas)


def copy_in(root: Path, files: list[Path]) -> None:
    for path in files:
        target = root / path.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def copy_clone(root: Path) -> None:
    """The tracked files as the worktree has them: a clone (plus uncommitted edits),
    without .venv, .cache or anything else left by earlier runs."""
    listed = run_checked(["git", "-C", str(REPO), "ls-files", "-z"]).split("\0")
    project = root / PROJECT.lstrip("/")
    for name in filter(None, listed):
        source = REPO / name
        if os.path.lexists(source):
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, project / name, follow_symlinks=False)


@contextmanager
def mounted(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev inside `root`; all unmounted on the way out, however it goes."""
    try:
        # Nix's sandbox makes "/" private: inside a chroot that needs "/" to be a mount.
        run_checked(["mount", "--bind", str(root), str(root)])
        run_checked(["mount", "--make-private", str(root)])
        run_checked(["mount", "-t", "proc", "proc", str(root / "proc")])
        run_checked(["mount", "-t", "sysfs", "sysfs", str(root / "sys")])
        run_checked(["mount", "--rbind", "/dev", str(root / "dev")])
        # A slave: unmounting the copy must never unmount the machine's own /dev/pts.
        run_checked(["mount", "--make-rslave", str(root / "dev")])
        yield
    finally:
        unmount_below(root)


def chroot_env() -> dict[str, str]:
    """A login's environment plus what reaches the registries (PIP_* variables, proxies);
    CI=true so that a tool setup.sh failed to install fails the inner tests, not skips."""
    env = {"PATH": CHROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "CI": "true"}
    env.update(
        (key, value)
        for key, value in os.environ.items()
        if key.startswith("PIP_") or key.lower() in PROXY_VARIABLES
    )
    return env


@dataclass(frozen=True)
class Step:
    command: str
    returncode: int | None  # None: timed out
    output: str
    seconds: float


def in_chroot(root: Path, command: str) -> Step:
    """`command` by bash, as root, in the project's directory inside `root`, in a PID
    namespace of its own: when it ends or times out, nothing it started lives on to keep
    the mounts busy, and nothing in it can signal this machine's processes."""
    started = time.monotonic()
    # Its own /proc too: Nix finds its builders' namespaces by their pids.
    unshare = ["unshare", "--pid", "--fork", "--kill-child", f"--mount-proc={root}/proc"]
    argv = [*unshare, "chroot", str(root), "/bin/bash"]
    process = subprocess.Popen(
        [*argv, "-c", f"cd {PROJECT} && {command}"],
        env=chroot_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    returncode: int | None
    try:
        output, _ = process.communicate(timeout=STEP_TIMEOUT_SECONDS)
        returncode = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        returncode = None
    return Step(command, returncode, output, time.monotonic() - started)


def fingerprint(root: Path) -> dict[str, tuple[int, int, int]]:
    """Mode, size and mtime of everything setup.sh may change."""
    found = {}
    for top in (*SETUP_TOUCHES, PROJECT.lstrip("/") + "/.venv"):
        for directory, dirs, files in os.walk(root / top):
            for name in [*dirs, *files]:
                path = Path(directory, name)
                stat = path.lstat()
                found[str(path.relative_to(root))] = (stat.st_mode, stat.st_size, stat.st_mtime_ns)
    return found


@dataclass(frozen=True)
class FreshRun:
    bare: Step  # before anything: what the base has
    demo: Step
    setup_again: Step
    changed_by_setup_again: list[str]
    nix_config: Step
    tests: Step
    users: str  # /etc/passwd after setup
    groups: str  # /etc/group after setup

    def show(self, *steps: Step) -> None:
        """Printed by every test first: pytest shows it when the test fails."""
        for step in steps:
            print(f"==== {step.command} (exit {step.returncode}, {step.seconds:.0f} s) ====")
            print(step.output)


@pytest.fixture(scope="module")
def fresh() -> FreshRun:
    for tool in ("debootstrap", "chroot", "unshare", "mount", "umount", "tar", "git"):
        require(shutil.which(tool) is not None, f"{tool} is not on PATH")
    require(os.geteuid() == 0, "debootstrap, mount and chroot need root")
    demo_command, test_command = readme_commands()
    started = time.monotonic()
    tarball = base_tarball()
    work = Path(tempfile.mkdtemp(prefix="nixos-autodeploy-fresh-"))
    root = work / "root"
    try:
        root.mkdir()
        run_checked(["tar", "--numeric-owner", "-C", str(root), "-xf", str(tarball)])
        copy_in(root, [Path("/etc/resolv.conf"), *registry_files()])
        copy_clone(root)
        with (root / "etc/login.defs").open("a") as defs:
            defs.write("SYS_UID_MIN {}\nSYS_UID_MAX {}\n".format(*SYSTEM_UIDS))
        with mounted(root):
            bare = in_chroot(
                root,
                "command -v nix-build python3; getent group nixbld; "
                "ls -d /nix /etc/nix .venv /opt/wheels 2>/dev/null; true",
            )
            demo = in_chroot(root, demo_command)
            before = fingerprint(root)
            setup_again = in_chroot(root, "bash scripts/setup.sh")
            after = fingerprint(root)
            changed = sorted(
                k for k in before.keys() | after.keys() if before.get(k) != after.get(k)
            )
            nix_config = in_chroot(
                root, "nix --extra-experimental-features nix-command show-config"
            )
            tests = in_chroot(root, f"{test_command} {TEST_LIMIT}")
        result = FreshRun(
            bare=bare,
            demo=demo,
            setup_again=setup_again,
            changed_by_setup_again=changed,
            nix_config=nix_config,
            tests=tests,
            users=(root / "etc/passwd").read_text(),
            groups=(root / "etc/group").read_text(),
        )
    finally:
        remove_tree(work)
    print(
        f"fresh test: demo {demo.seconds:.0f} s, tests {tests.seconds:.0f} s, "
        f"total {time.monotonic() - started:.0f} s"
    )
    return result


def test_base_is_bare(fresh: FreshRun) -> None:
    """Before setup: no Nix, no Python, no build users, no venv, no /nix, nothing of pip's
    wheels. Otherwise the run below would prove nothing."""
    fresh.show(fresh.bare)
    assert fresh.bare.returncode == 0
    assert fresh.bare.output == ""


def test_demo_shows_the_promised_states(fresh: FreshRun) -> None:
    fresh.show(fresh.demo)
    assert fresh.demo.returncode == 0
    states = re.findall(r"^state: (\S+)$", fresh.demo.output, re.MULTILINE)
    assert states == DEMO_STATES
    assert "demo done" in fresh.demo.output


def test_setup_makes_build_users_as_debian_does(fresh: FreshRun) -> None:
    group = [line for line in fresh.groups.splitlines() if line.startswith("nixbld:")]
    assert len(group) == 1, fresh.groups
    assert group[0].split(":")[3].split(",") == [f"nixbld{n}" for n in range(1, 11)]
    gid = group[0].split(":")[2]
    users = {line.split(":")[0]: line.split(":") for line in fresh.users.splitlines()}
    for n in range(1, 11):
        _, _, uid, user_gid, comment, home, shell = users[f"nixbld{n}"]
        assert SYSTEM_UIDS[0] <= int(uid) <= SYSTEM_UIDS[1], "a system user"
        assert (user_gid, comment, home, shell) == (
            gid,
            f"Nix build user {n}",
            "/var/empty",
            "/usr/sbin/nologin",
        )


def test_setup_run_twice_changes_nothing(fresh: FreshRun) -> None:
    fresh.show(fresh.setup_again)
    assert fresh.setup_again.returncode == 0
    assert fresh.changed_by_setup_again == []


def test_setup_keeps_nix_checking_signatures(fresh: FreshRun) -> None:
    """Setup writes no nix.conf: the real store still requires signatures and sandboxes."""
    fresh.show(fresh.nix_config)
    assert fresh.nix_config.returncode == 0
    settings = dict(
        line.split(" = ", 1) for line in fresh.nix_config.output.splitlines() if " = " in line
    )
    assert settings["require-sigs"] == "true"
    assert settings["sandbox"] == "true"
    assert settings["build-users-group"] == "nixbld"


def test_readme_test_command_passes(fresh: FreshRun) -> None:
    fresh.show(fresh.tests)
    assert fresh.tests.returncode == 0
    assert "Success: no issues found" in fresh.tests.output  # mypy --strict ran
    summary = fresh.tests.output.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed\b", summary), summary
    assert not re.search(r"failed|error|skipped", summary), summary


def test_a_failure_inside_the_chroot_leaves_no_mount(tmp_path: Path) -> None:
    """What the fixture relies on: however the run ends, nothing stays mounted (the next
    run, or a removal through a bind of /dev, would suffer)."""
    require(os.geteuid() == 0, "mounting needs root")
    root = tmp_path / "root"
    for name in ("proc", "sys", "dev"):
        (root / name).mkdir(parents=True)
    with pytest.raises(RuntimeError, match="a step failed"), mounted(root):
        assert [path.name for path in mounts_below(root)][-1:] == ["root"]
        assert (root / "dev" / "null").exists()
        assert (root / "proc" / "self").exists()
        raise RuntimeError("a step failed")
    assert mounts_below(root) == []
    remove_tree(root)
    assert not root.exists()
    assert Path("/dev/null").exists()
