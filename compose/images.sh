#!/usr/bin/env bash
# Builds the stack's images with BuildKit: gateway, worker and trainer always; where the official
# images cannot be pulled (no registry), also the local base (compose/base-image.sh), the model
# server stand-in and Redis that compose/offline.yml runs in their place. Layers and pip's cache
# (a BuildKit cache mount) are reused between builds. pip's CA bundle (PIP_CA, default the system
# one) is passed as the secret pip-ca, mounted for pip's step only; builds use the host's network,
# the only way pip reaches the package index from a container on these machines.
#   compose/images.sh            then: compose/compose.sh up -d   (make compose-up does both)
set -euo pipefail
cd "$(dirname "$0")/.."
official_python=$(sed -n 's/^ARG PYTHON_IMAGE=//p' gateway/Dockerfile)
serving_image=$(sed -n 's/^ *image: \(tensorflow\/serving:.*\)/\1/p' docker-compose.yml)
local_base=cifar10/python:3.11-bookworm
pip_ca=${PIP_CA:-/etc/ssl/certs/ca-certificates.crt}

present_or_pulled() { docker image inspect "$1" >/dev/null 2>&1 || docker pull -q "$1" >/dev/null 2>&1; }
# Docker's CLI needs the buildx plugin for BuildKit since 23.0; Debian's docker.io (20.10) has it built in.
if docker buildx version >/dev/null 2>&1; then cli=(docker); else cli=(env DOCKER_BUILDKIT=1 /usr/bin/docker); fi
secret=(); [ -f "$pip_ca" ] && secret=(--secret "id=pip-ca,src=$pip_ca")

build() {  # build TAG DOCKERFILE CONTEXT BASE
    local started=$SECONDS
    "${cli[@]}" build --quiet --network host "${secret[@]}" --build-arg "PYTHON_IMAGE=$4" -f "$2" -t "$1" "$3" >/dev/null
    printf '%-34s %5d MB  built in %d s\n' "$1" "$(docker image inspect -f '{{.Size}}' "$1" | awk '{print int($1 / 1e6)}')" \
        $((SECONDS - started))
}

if present_or_pulled "$official_python"; then base=$official_python; else compose/base-image.sh "$local_base"; base=$local_base; fi
build cifar10/gateway:1.0.0 gateway/Dockerfile . "$base"
build cifar10/worker:1.0.0 worker/Dockerfile . "$base"
build cifar10/trainer:1.0.0 training/Dockerfile . "$base"
if ! present_or_pulled "$serving_image"; then
    echo "$serving_image cannot be pulled: building the stand-ins compose/offline.yml runs"
    compose/base-image.sh "$local_base"
    build cifar10/tfserving-standin:1.0.0 tfserving/Dockerfile . "$base"
    build cifar10/redis:7-bookworm compose/redis.Dockerfile compose "$local_base"
fi
