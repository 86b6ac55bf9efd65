#!/usr/bin/env bash
# Build a wheelhouse for offline installs: CLADNet and the dependencies of one role (the
# agent's by default) as wheels in OUTDIR, plus install-agent.sh and the agent's systemd
# units, so OUTDIR alone (copied, or packed with `tar -C OUTDIR -czf wheelhouse.tar.gz .`)
# is all a machine without package-index access needs:
#
#   deploy/build-wheelhouse.sh OUTDIR
#   # on the target (root):  CLADNET_JOIN_TOKEN=… bash OUTDIR/install-agent.sh --wheels OUTDIR --join …
#
#   deploy/build-wheelhouse.sh --extras controller,collector deploy/compose/wheelhouse
#
# --extras picks the roles (pyproject.toml's extras: agent, controller, collector, cli,
# relay, ec2); only their dependencies go in, so an agent's wheelhouse carries no
# FastAPI, uvicorn, etcd client, gRPC or CLI libraries.
# Wheels with compiled parts (cryptography, psutil, grpcio, pydantic-core, …) are built
# for this machine's Python version and architecture: build on the same Python minor
# version (Debian 12: 3.11) and CPU architecture as the targets. PYTHON selects the
# interpreter (default python3); the build runs in a throw-away venv of it, with pip's
# own configuration (index, proxy, constraints) as set on this machine.
set -euo pipefail

usage() { echo "usage: $0 [--extras ROLE[,ROLE…]] OUTDIR   (default role: agent)" >&2; exit 2; }
EXTRAS=agent
case "${1:-}" in -h|--help) usage ;; esac
if [ "${1:-}" = --extras ]; then
  [ $# -ge 2 ] || usage
  EXTRAS="$2"
  shift 2
fi
[ $# -eq 1 ] || usage
[[ "$EXTRAS" =~ ^[a-z0-9]+(,[a-z0-9]+)*$ ]] || { echo "$0: bad --extras: $EXTRAS" >&2; exit 2; }

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
# The project itself and the dependencies of the chosen roles, nothing else.
"$work/venv/bin/pip" wheel --quiet --wheel-dir "$OUT" "$work/src[$EXTRAS]"

# What the target needs besides the wheels.
install -m 0755 "$HERE/install-agent.sh" "$OUT/install-agent.sh"
install -m 0644 "$HERE/systemd/cladnet-agent.service" "$OUT/cladnet-agent.service"
install -m 0644 "$HERE/systemd/cladnet-agent-commands.service" \
  "$OUT/cladnet-agent-commands.service"
(cd "$OUT" && ls ./*.whl | sed 's|^\./||' | sort > MANIFEST)
echo "wheelhouse: $OUT ($EXTRAS: $(wc -l < "$OUT/MANIFEST") wheels)"
