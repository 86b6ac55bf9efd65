#!/usr/bin/env bash
# The main job: a multi-cloud on this machine (root, Debian 12). Installs what is missing,
# then `cladnet demo up`: etcd, Mosquitto, collector, controller; three clouds (two on
# 192.168.1.0/24) behind NAT; six VMs; full WireGuard mesh; status and ping matrix.
#   bash deploy/demo.sh [up|status|suspend VM|resume VM|down]   (default: up)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "deploy/demo.sh: run as root (it creates namespaces, bridges and WireGuard devices)" >&2
  exit 1
fi
bash deploy/setup.sh >/dev/null
exec "${CLADNET_VENV:-.venv}/bin/cladnet" demo "${@:-up}"
