#!/usr/bin/env bash
# Build the local base image `genserve-base:bookworm` from Debian packages, for machines that
# cannot pull from a registry: debootstrap a minimal Debian with Python 3.11, import it into Docker.
# Usage: sudo docker/make-base.sh [tag]   (needs debootstrap: apt-get install debootstrap)
set -euo pipefail
tag=${1:-genserve-base:bookworm}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import - "$tag"
echo "built $tag"
