#!/usr/bin/env bash
# Install what the demo and the tests need on a fresh Debian/Ubuntu machine (as root):
# Nix, Prometheus, node_exporter, qemu and debootstrap for the guest test, and .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(nix-bin prometheus prometheus-node-exporter qemu-system-x86 qemu-utils debootstrap
  python3 python3-venv util-linux e2fsprogs cpio curl time openssl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The packaged services must not start: the tests run their own on free loopback ports.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi
# Debian's nix-bin: let root build in the chroot stores the tests use.
mkdir -p /nix/var/nix/gcroots /nix/var/nix/profiles

python=python3
command -v python3.11 >/dev/null && python=python3.11
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,lint]'
