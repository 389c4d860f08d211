#!/usr/bin/env bash
# docker compose (v2, or Debian's docker-compose v1) on docker-compose.yml, plus compose/offline.yml
# where the official model server image is not here (compose/images.sh builds the stand-ins then).
#   compose/compose.sh up -d | ps | logs worker | down -v | --profile train run --rm trainer ...
set -euo pipefail
cd "$(dirname "$0")/.."
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
files=(-f docker-compose.yml)
serving_image=$(sed -n 's/^ *image: \(tensorflow\/serving:.*\)/\1/p' docker-compose.yml)
docker image inspect "$serving_image" >/dev/null 2>&1 || files+=(-f compose/offline.yml)
exec "${compose[@]}" "${files[@]}" "$@"
