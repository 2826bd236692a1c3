#!/bin/sh
# Build the Debian guest for tests/test_guest.py.
#   build-image.sh CACHE OUT
# Two levels, both cached in CACHE:
#   debootstrap-<hash of suite+packages>.tar   the slow part (~2 min), reused
#                                              while the package list is unchanged
#   OUT/{vmlinuz,initrd.img,base.img}          that root plus image/ (the guest's
#                                              units and scripts, its initramfs hook) as a
#                                              raw ext4 disk; the caller keys OUT by this
#                                              script and image/
#   OUT/systemd-bootx64.efi                    the guest's systemd-boot, for the ESP the
#                                              host builds for the EFI session
# The project itself is NOT in the image: each run shares it over 9p.
set -eu
CACHE=$1
OUT=$2
# The Debian mirror this machine's apt already uses (deb822 or one-line sources).
host_mirror() {
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    awk '$1 == "URIs:" { print $2; exit }' /etc/apt/sources.list.d/debian.sources
  elif [ -f /etc/apt/sources.list ]; then
    awk '$1 == "deb" && $0 !~ /security/ { print ($2 ~ /^\[/ ? $3 : $2); exit }' /etc/apt/sources.list
  fi
}
MIRROR=${GUEST_MIRROR:-$(host_mirror)}
[ -n "$MIRROR" ] || { echo "no Debian mirror in apt's sources; set GUEST_MIRROR" >&2; exit 1; }
SUITE=bookworm
PACKAGES=systemd,systemd-sysv,systemd-boot,dbus,linux-image-amd64,kexec-tools,nix-bin,libdbi-perl,python3,python3-requests,python3-prometheus-client,python3-rich
HERE=$(cd "$(dirname "$0")" && pwd)

mkdir -p "$CACHE"
TMP=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
ROOT=$TMP/rootfs

BASE_KEY=$(printf '%s %s\n' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-16)
TARBALL=$CACHE/debootstrap-$BASE_KEY.tar
if [ ! -f "$TARBALL" ]; then
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR"
  chroot "$ROOT" apt-get clean
  tar -C "$ROOT" -cf "$TMP/rootfs.tar" .
  rm -f "$CACHE"/debootstrap-*.tar  # a changed package list leaves no stale root behind
  mv "$TMP/rootfs.tar" "$TARBALL"
else
  mkdir "$ROOT"
  tar -C "$ROOT" -xf "$TARBALL"
fi

# Guest configuration: units and scripts from image/; root without password on
# the console (debugging by hand); kexec-tools must not take over reboots (the
# agent decides when to kexec).
cp -r "$HERE/image/." "$ROOT/"
mkdir -p "$ROOT/var/log/journal"  # persistent journal: the test reads the previous boot's
chmod 755 "$ROOT"/usr/local/sbin/* "$ROOT"/usr/local/bin/* "$ROOT"/etc/initramfs-tools/scripts/*/*
echo autodeploy-guest > "$ROOT/etc/hostname"
printf '/dev/vda / ext4 rw 0 1\n' > "$ROOT/etc/fstab"
chroot "$ROOT" passwd -d root >/dev/null
echo 'LOAD_KEXEC=false' > "$ROOT/etc/default/kexec"
chroot "$ROOT" systemctl enable autodeploy-guest-stage2.service autodeploy-guest-driver.service
# The initramfs with image/'s hook (NixOS's stage 1 under boot.panic_on_fail).
mount -t proc proc "$ROOT/proc"
chroot "$ROOT" update-initramfs -u -k all >/dev/null || { umount "$ROOT/proc"; exit 1; }
umount "$ROOT/proc"

cp -L "$ROOT/vmlinuz" "$TMP/vmlinuz"
cp -L "$ROOT/initrd.img" "$TMP/initrd.img"
cp "$ROOT/usr/lib/systemd/boot/efi/systemd-bootx64.efi" "$TMP/systemd-bootx64.efi"
mkfs.ext4 -q -L guestroot -d "$ROOT" "$TMP/base.img" 3G
rm -rf "$ROOT"

rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
mv "$TMP" "$OUT"
trap - EXIT
