#!/usr/bin/env bash
# Build the fedge coordinator and agent images from offline bundles.
#
#   deploy/container/build.sh [--base IMAGE] [--arch amd64|arm64] [--tag TAG] [--context DIR]
#
# --base     the base image (default python:3.11-slim; any image with python3.11 and venv)
# --arch     the target architecture (default: this machine's); arm64 on x86 needs
#            qemu-user-static registered with binfmt_misc
# --tag      the image tag (default: fedge's version)
# --context  where to write the build context (default: a temporary folder)
# Uses podman if present, else docker. Building the bundles needs the package index;
# the image build itself does not.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
base="python:3.11-slim"
arch=""
tag=""
context=""
while [ $# -gt 0 ]; do
    case "$1" in
        --base) base="$2"; shift 2 ;;
        --arch) arch="$2"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        --context) context="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
engine=$(command -v podman || command -v docker || true)
[ -n "$engine" ] || { echo "build.sh: neither podman nor docker is installed" >&2; exit 2; }
fedge=${FEDGE:-fedge}
command -v "$fedge" >/dev/null || { echo "build.sh: $fedge not found (set FEDGE=/path/to/fedge)" >&2; exit 2; }
arch=${arch:-$(dpkg --print-architecture 2>/dev/null || uname -m)}
case "$arch" in
    amd64|x86_64) arch=amd64; platform=manylinux2014_x86_64 ;;
    arm64|aarch64) arch=arm64; platform=manylinux2014_aarch64 ;;
    *) echo "build.sh: --arch must be amd64 or arm64, got $arch" >&2; exit 2 ;;
esac
tag=${tag:-$("$fedge" --version | awk '{print $2}')}
cleanup=""
if [ -z "$context" ]; then
    context=$(mktemp -d /var/tmp/fedge-context.XXXXXX)
    cleanup="$context"
fi
trap '[ -z "$cleanup" ] || rm -rf "$cleanup"' EXIT
rm -rf "$context/bundles"
"$fedge" bundle --out "$context/bundles/agent" --extras agent --platform "$platform"
"$fedge" bundle --out "$context/bundles/coordinator" --extras coordinator --platform "$platform"
# HEALTHCHECK is a Docker image-format feature; podman drops it from OCI images.
format=()
case "$engine" in *podman) format=(--format docker) ;; esac
for target in coordinator agent; do
    "$engine" build "${format[@]}" --arch "$arch" --build-arg "BASE=$base" --target "$target" \
        -f "$here/Containerfile" -t "localhost/fedge-$target:$tag-$arch" "$context"
    echo "localhost/fedge-$target:$tag-$arch"
done
