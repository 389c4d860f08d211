#!/usr/bin/env bash
# A Python 3.11 Debian bookworm base image built on this machine, for machines that cannot pull
# python:3.11-slim-bookworm (no registry): debootstrap's minbase from the Debian mirror, then
# `docker import`. The images' Dockerfiles take it as PYTHON_IMAGE; the official image stays
# their default. Needs root, debootstrap and a running Docker daemon.
#   compose/base-image.sh [IMAGE]       (default cifar10/python:3.11-bookworm; kept if present)
set -euo pipefail
image=${1:-cifar10/python:3.11-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$image" >/dev/null 2>&1; then
    echo "$image: present"
    exit 0
fi
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
# python-is-python3: the Dockerfiles call `python`, as in the official image.
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$mirror" >/dev/null
# What a container never reads: package lists, caches, translations, docs, info and man pages
# (the licences in /usr/share/common-licenses and each package's copyright stay).
find "$rootfs"/usr/share/doc -type f ! -name copyright -delete
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
tar -C "$rootfs" -c . | docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$image" >/dev/null
echo "$image: built ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}'))"
