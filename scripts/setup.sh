#!/usr/bin/env bash
# Install what the demo and the tests need on a fresh Debian 12 machine (as root): Nix,
# Prometheus, node_exporter, qemu, debootstrap, UEFI firmware and ESP tools for the guest
# test, Nix's build users, and .venv. README.md ("What setup changes on your machine")
# lists every change.
# Idempotent: a second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(nix-bin prometheus prometheus-node-exporter qemu-system-x86 qemu-utils debootstrap
  ovmf fdisk dosfstools mtools python3 python3-venv util-linux e2fsprogs cpio curl time openssl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The packaged services must not start: the tests run their own on free loopback ports.
  # (A policy the machine already has is left as it is.)
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Nix run by root builds as the members of build-users-group (compiled-in default
# `nixbld`, whether or not /etc/nix/nix.conf says so). Debian's nix-bin creates none; its
# nix-setup-systemd does, in its postinst, exactly like this -- but that package also
# enables a daemon and sets `sandbox = false`, which the tests do not want.
groupadd --force --system nixbld
for n in $(seq 1 10); do
  if ! id "nixbld$n" >/dev/null 2>&1; then
    useradd --system --comment "Nix build user $n" --home-dir /var/empty \
      --gid nixbld --groups nixbld --no-user-group --shell /usr/sbin/nologin "nixbld$n"
  fi
done
# Debian's nix-bin: let root build in the chroot stores the tests use.
mkdir -p /nix/var/nix/gcroots /nix/var/nix/profiles

python=python3
command -v python3.11 >/dev/null && python=python3.11
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# Reinstall only when the dependencies changed (the package itself is editable).
stamp=".venv/installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test,lint]'
  rm -f .venv/installed-*
  touch "$stamp"
fi
