#!/usr/bin/env bash
# Build the wheelhouse for offline agent installs: CLADNet and every dependency as
# wheels in OUTDIR, plus install-agent.sh and the agent's systemd unit, so OUTDIR alone
# (copied, or packed with `tar -C OUTDIR -czf wheelhouse.tar.gz .`) is all a machine
# without package-index access needs:
#
#   deploy/build-wheelhouse.sh OUTDIR
#   # on the target (root):  CLADNET_JOIN_TOKEN=… bash OUTDIR/install-agent.sh --wheels OUTDIR --join …
#
# Wheels with compiled parts (grpcio, cryptography, psutil, pydantic-core, …) are built
# for this machine's Python version and architecture: build on the same Python minor
# version (Debian 12: 3.11) and CPU architecture as the targets. PYTHON selects the
# interpreter (default python3); the build runs in a throw-away venv of it, with pip's
# own configuration (index, proxy, constraints) as set on this machine.
set -euo pipefail

usage() { echo "usage: $0 OUTDIR" >&2; exit 2; }
[ $# -eq 1 ] || usage
case "$1" in -h|--help) usage ;; esac

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
OUT="$1"
PYTHON="${PYTHON:-python3}"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m venv "$work/venv" || {
  echo "$0: '$PYTHON -m venv' failed (Debian: apt-get install python3-venv)" >&2
  exit 1
}
# Build from a copy: setuptools writes build/ and *.egg-info into the tree it builds,
# and a stale build/ would put deleted modules into the wheel.
mkdir "$work/src"
tar -C "$REPO" --exclude='./.*' --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=./artifacts --exclude=./deploy/compose/wheelhouse \
    -cf - . | tar -C "$work/src" -xf -
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The project itself and all its runtime dependencies (not the [test] extra).
"$work/venv/bin/pip" wheel --quiet --wheel-dir "$OUT" "$work/src"

# What the target needs besides the wheels.
install -m 0755 "$HERE/install-agent.sh" "$OUT/install-agent.sh"
install -m 0644 "$HERE/systemd/cladnet-agent.service" "$OUT/cladnet-agent.service"
install -m 0644 "$HERE/systemd/cladnet-agent-commands.service" \
  "$OUT/cladnet-agent-commands.service"
(cd "$OUT" && ls ./*.whl | sed 's|^\./||' | sort > MANIFEST)
echo "wheelhouse: $OUT ($(wc -l < "$OUT/MANIFEST") wheels)"
