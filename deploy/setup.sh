#!/usr/bin/env bash
# Install everything CLADNet and its tests need on Debian 12: system packages and a venv.
# Idempotent; run as root (or with sudo available).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

PACKAGES=(
  etcd-server etcd-client          # the control plane's store (and etcdctl for tests)
  wireguard-go wireguard-tools     # userspace WireGuard + wg
  iproute2 nftables iputils-ping   # test hosts are network namespaces
  mosquitto mosquitto-clients      # MQTT broker for metrics
  victoria-metrics                 # scale-out metrics store (collector backend)
  iperf3 nebula                    # data-plane benchmark (nebula: a same-run baseline)
  prometheus-node-exporter         # agent-footprint benchmark's same-run baseline
  chromium chromium-driver         # dashboard tests in a headless browser
  curl ca-certificates procps jq  # jq: the README walk-through (run by tests/test_demo.py)
  openssh-server openssh-client    # the ssh driver's tests run a real sshd in a namespace
  systemd docker-compose busybox gettext-base  # deploy/ tests: systemd-analyze, compose config, sh, envsubst
  python3 python3-venv python3-dev gcc
)
missing=()
for p in "${PACKAGES[@]}"; do
  [[ "$p" == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  # --no-install-recommends: wireguard-tools would otherwise pull in a kernel image.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

VENV="${CLADNET_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -e '.[test]'
echo "set-up done: venv in $VENV"
