#!/usr/bin/env bash
# `make up` needs redis-server on PATH: installs Debian's package where it can (root, or sudo without
# a password), otherwise stops with the one command to run.
set -euo pipefail
command -v redis-server >/dev/null && exit 0
if [ "$(id -u)" -eq 0 ]; then SUDO=""
elif sudo -n true 2>/dev/null; then SUDO="sudo"
else
    echo "redis-server is not installed. Run this once, then make up again:" >&2
    echo "  sudo apt-get install -y redis-server" >&2
    exit 1
fi
echo "installing redis-server (apt)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
