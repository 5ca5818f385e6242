#!/usr/bin/env bash
# Build a minimal Debian bookworm image with python3 and python3-venv, from
# Debian's own packages, and import it into Podman as IMAGE (default
# localhost/fedge-base:bookworm-ARCH). For machines that reach Debian's
# package mirrors but no container registry. Needs root, debootstrap and
# podman; for a foreign ARCH, qemu-user-static registered with binfmt_misc.
#
#   deploy/podman/build-base.sh [--arch amd64|arm64] [--image NAME] [--mirror URL]
set -euo pipefail

arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
image=""
mirror="http://deb.debian.org/debian"
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch="$2"; shift 2 ;;
        --image) image="$2"; shift 2 ;;
        --mirror) mirror="$2"; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "build-base.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
case "$arch" in amd64|arm64) ;; *) echo "build-base.sh: --arch must be amd64 or arm64, got $arch" >&2; exit 2 ;; esac
image="${image:-localhost/fedge-base:bookworm-$arch}"

for tool in debootstrap podman tar; do
    command -v "$tool" >/dev/null || { echo "build-base.sh: $tool is missing (apt-get install $tool)" >&2; exit 2; }
done
if [ "$(id -u)" -ne 0 ]; then
    echo "build-base.sh: debootstrap needs root" >&2
    exit 2
fi

root=$(mktemp -d /var/tmp/fedge-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "build-base.sh: debootstrap bookworm ($arch) into $root" >&2
debootstrap --arch="$arch" --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
# Keep the image small: package lists and caches are not needed at run time.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/*
tar -C "$root" -c . | podman import --arch "$arch" \
    --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$image" >/dev/null
echo "$image"
