#!/usr/bin/env bash
# Install the CLADNet agent from a wheelhouse, without any package index (offline).
#
#   install-agent.sh --wheels DIR [--prefix /opt/cladnet] [--no-systemd]
#                    [--join URL [--token-file F] [--ca-hash sha256:…] [--label k=v]…
#                     [--labels k=v,…] [--hostname NAME]] [--state-dir /var/lib/cladnet]
#
# DIR comes from deploy/build-wheelhouse.sh (which also copies this script and the unit
# into it). Steps, each skipped when already done, so running it again is safe and is
# also how to upgrade (a rebuilt wheelhouse is installed; the service is restarted):
#   1. python3 -m venv PREFIX/venv                   (Debian: python3-venv)
#   2. pip install --no-index --find-links DIR 'cladnet[agent]'   (the agent's set only)
#   3. unless --no-systemd: cladnet-agent.service into /etc/systemd/system, its
#      ExecStart pointing at PREFIX/venv/bin/cladnet-agent; systemctl daemon-reload
#   4. with --join: cladnet-agent join --no-run … (skipped if this controller and token
#      were already used and that network is still joined), then
#      systemctl enable --now cladnet-agent — only where systemd runs; otherwise it
#      prints what to run.
# The join token comes from the environment (CLADNET_JOIN_TOKEN) or a root-only file
# (--token-file), never from a command line, which anyone on the host sees in `ps`;
# it reaches cladnet-agent in its environment too. The join retries for up to
# CLADNET_JOIN_TIMEOUT seconds (default 600) while the controller is down or busy.
# The agent needs WireGuard: the kernel module or wireguard-go, and wireguard-tools.
# PYTHON selects the interpreter for the venv (default python3, at least 3.11).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
PREFIX=/opt/cladnet
WHEELS=""
SYSTEMD=1
UNIT_DIR=/etc/systemd/system
STATE_DIR=/var/lib/cladnet
JOIN_URL=""
TOKEN="${CLADNET_JOIN_TOKEN:-}"
CA_HASH=""
AGENT_HOSTNAME=""
LABELS=()
PYTHON="${PYTHON:-python3}"

die() { echo "install-agent: $*" >&2; exit 1; }
say() { echo "install-agent: $*"; }
usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) need "$@"; WHEELS="$2"; shift 2 ;;
    --prefix) need "$@"; PREFIX="$2"; shift 2 ;;
    --no-systemd) SYSTEMD=0; shift ;;
    # Where the unit goes (tests; default /etc/systemd/system). systemctl is only
    # called for the default.
    --unit-dir) need "$@"; UNIT_DIR="$2"; shift 2 ;;
    --state-dir) need "$@"; STATE_DIR="$2"; shift 2 ;;
    --join) need "$@"; JOIN_URL="$2"; shift 2 ;;
    --token-file)
      need "$@"
      [ -r "$2" ] || die "cannot read --token-file $2"
      TOKEN="$(tr -d '[:space:]' < "$2")"
      shift 2 ;;
    --token) die "--token is not accepted (it shows in ps): set CLADNET_JOIN_TOKEN or use --token-file" ;;
    # An empty value is allowed for --ca-hash and --labels (templates fill them).
    --ca-hash) [ $# -ge 2 ] || die "--ca-hash needs a value"; CA_HASH="$2"; shift 2 ;;
    --hostname) need "$@"; AGENT_HOSTNAME="$2"; shift 2 ;;
    --label) need "$@"; LABELS+=("$2"); shift 2 ;;
    --labels)
      [ $# -ge 2 ] || die "--labels needs a value"
      IFS=',' read -r -a more <<< "$2"
      for l in "${more[@]}"; do
        l="${l#"${l%%[![:space:]]*}"}"; l="${l%"${l##*[![:space:]]}"}"
        if [ -n "$l" ]; then LABELS+=("$l"); fi
      done
      shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "install-agent: unknown argument: $1" >&2; usage ;;
  esac
done

[ -n "$WHEELS" ] || die "--wheels DIR is required (build it with deploy/build-wheelhouse.sh)"
[ -d "$WHEELS" ] || die "no such directory: $WHEELS"
WHEELS="$(cd "$WHEELS" && pwd)"
[[ "$PREFIX" =~ ^/[A-Za-z0-9._/-]+$ ]] || die "--prefix must be an absolute path of [A-Za-z0-9._/-]"
PREFIX="${PREFIX%/}"
for l in "${LABELS[@]+"${LABELS[@]}"}"; do
  [[ "$l" == ?*=* ]] || die "a label must be key=value, got '$l'"
done
if [ -n "$JOIN_URL" ] && [ -z "$TOKEN" ]; then
  die "--join needs a token: set CLADNET_JOIN_TOKEN or use --token-file"
fi
if [ "$SYSTEMD" = 1 ] && [ "$STATE_DIR" != /var/lib/cladnet ]; then
  die "the unit keeps its state in /var/lib/cladnet; --state-dir only with --no-systemd"
fi

wheels=("$WHEELS"/cladnet-*.whl)
[ -f "${wheels[0]}" ] || die "no cladnet-*.whl in $WHEELS"
wheel="$(printf '%s\n' "${wheels[@]##*/}" | sort -V | tail -n 1)"

# ---- 1. the venv ---------------------------------------------------------------------
VENV="$PREFIX/venv"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "$PYTHON is missing or older than 3.11"
  mkdir -p "$PREFIX"
  "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv' failed (Debian: apt-get install python3-venv)"
  say "created $VENV"
fi

# ---- 2. the package, from the wheelhouse only -------------------------------------------
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$VENV/bin/pip" install --quiet --no-index --find-links "$WHEELS" --upgrade 'cladnet[agent]' \
  || die "cladnet[agent] is not installable from $WHEELS alone (build it with deploy/build-wheelhouse.sh, role agent)"
# A rebuilt wheel of the same version is not an upgrade to pip: compare the wheel itself.
sum="$(sha256sum "$WHEELS/$wheel" | cut -d' ' -f1)"
marker="$PREFIX/.cladnet-wheel.sha256"
upgraded=0  # new code installed: a running service is restarted
if [ "$(cat "$marker" 2>/dev/null)" != "$sum" ]; then
  if [ -f "$marker" ]; then
    "$VENV/bin/pip" install --quiet --no-index --no-deps --force-reinstall "$WHEELS/$wheel"
  fi
  echo "$sum" > "$marker"
  upgraded=1
  say "installed $wheel into $VENV"
else
  say "$wheel already installed in $VENV"
fi
"$VENV/bin/cladnet-agent" --help >/dev/null || die "$VENV/bin/cladnet-agent does not run"

# ---- 3. the systemd unit ---------------------------------------------------------------
systemd_running=0
if [ "$SYSTEMD" = 1 ] && [ "$UNIT_DIR" = /etc/systemd/system ] && [ -d /run/systemd/system ]; then
  systemd_running=1
fi
if [ "$SYSTEMD" = 1 ]; then
  src=""
  for candidate in "$HERE/systemd/cladnet-agent.service" "$HERE/cladnet-agent.service" \
                   "$WHEELS/cladnet-agent.service"; do
    if [ -f "$candidate" ]; then src="$candidate"; break; fi
  done
  [ -n "$src" ] || die "cladnet-agent.service not found next to this script or in $WHEELS"
  case "$PREFIX/" in
    /home/*|/root/*|/tmp/*|/var/tmp/*|/run/user/*)
      echo "install-agent: warning: the unit has ProtectHome=yes and PrivateTmp=yes;" \
           "the service cannot see $PREFIX" >&2 ;;
  esac
  mkdir -p "$UNIT_DIR"
  tmp_unit="$(mktemp)"
  trap 'rm -f "$tmp_unit"' EXIT
  sed "s|/opt/cladnet/venv/bin/cladnet-agent|$VENV/bin/cladnet-agent|g" "$src" > "$tmp_unit"
  grep -q "^ExecStart=$VENV/bin/cladnet-agent " "$tmp_unit" \
    || die "$src has no ExecStart=/opt/cladnet/venv/bin/cladnet-agent line to adjust"
  if cmp -s "$tmp_unit" "$UNIT_DIR/cladnet-agent.service"; then
    say "unit $UNIT_DIR/cladnet-agent.service unchanged"
  else
    install -m 0644 "$tmp_unit" "$UNIT_DIR/cladnet-agent.service"
    say "installed $UNIT_DIR/cladnet-agent.service"
    if [ "$systemd_running" = 1 ]; then systemctl daemon-reload; fi
  fi
  # The remote-commands unit goes next to it, never enabled here: only the VMs of a
  # group created with allow_commands enable it.
  commands_src="$(dirname "$src")/cladnet-agent-commands.service"
  if [ -f "$commands_src" ]; then
    sed "s|/opt/cladnet/venv/bin/cladnet-agent|$VENV/bin/cladnet-agent|g" "$commands_src" \
      > "$tmp_unit"
    if ! cmp -s "$tmp_unit" "$UNIT_DIR/cladnet-agent-commands.service"; then
      install -m 0644 "$tmp_unit" "$UNIT_DIR/cladnet-agent-commands.service"
      say "installed $UNIT_DIR/cladnet-agent-commands.service (not enabled)"
      if [ "$systemd_running" = 1 ]; then systemctl daemon-reload; fi
    fi
  fi
  if [ "$systemd_running" = 1 ] && [ "$upgraded" = 1 ]; then
    systemctl try-restart cladnet-agent.service  # runs the new code; a no-op if stopped
    systemctl try-restart cladnet-agent-commands.service
  fi
fi

# ---- 4. join -----------------------------------------------------------------------------
if [ -n "$JOIN_URL" ]; then
  # Remember which controller + token we joined with (a hash, not the token), so a
  # second run does not join again while that network is still in the state dir.
  join_key="$(printf '%s\n%s\n' "$JOIN_URL" "$TOKEN" | sha256sum | cut -d' ' -f1)"
  joined_file="$PREFIX/.cladnet-joined"
  joined_net=""
  if [ -f "$joined_file" ]; then
    joined_net="$(awk -v k="$join_key" '$1 == k { print $2 }' "$joined_file" | tail -n 1)"
  fi
  still_member=0
  if [ -n "$joined_net" ]; then
    if "$VENV/bin/cladnet-agent" --log-level error status --state-dir "$STATE_DIR" 2>/dev/null \
      | "$VENV/bin/python" -c 'import json, sys; sys.exit(sys.argv[1] not in [n["network"] for n in json.load(sys.stdin)])' "$joined_net"; then
      still_member=1
    fi
  fi
  restart=0  # an upgrade alone was handled above (try-restart)
  if [ "$still_member" = 1 ]; then
    say "already joined network '$joined_net' with this controller and token; not joining again"
  else
    args=(join --no-run --controller "$JOIN_URL" --state-dir "$STATE_DIR")
    if [ -n "$CA_HASH" ]; then args+=(--ca-hash "$CA_HASH"); fi
    if [ -n "$AGENT_HOSTNAME" ]; then args+=(--hostname "$AGENT_HOSTNAME"); fi
    for l in "${LABELS[@]+"${LABELS[@]}"}"; do args+=(--label "$l"); done
    out="$(CLADNET_JOIN_TOKEN="$TOKEN" "$VENV/bin/cladnet-agent" "${args[@]}")" \
      || die "cladnet-agent join failed"
    net="$(printf '%s\n' "$out" | tail -n 1 | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["network"])')" \
      || die "cladnet-agent join said something unexpected: $out"
    echo "$join_key $net" >> "$joined_file"
    chmod 0600 "$joined_file"
    say "joined: $(printf '%s\n' "$out" | tail -n 1)"
    restart=1
  fi
  if [ "$systemd_running" = 1 ]; then
    # A running agent picks up a new network on restart; an untouched one keeps running.
    if [ "$restart" = 1 ] && systemctl is-active --quiet cladnet-agent.service; then
      systemctl restart cladnet-agent.service
    fi
    systemctl enable --now cladnet-agent.service
    say "cladnet-agent.service enabled and running"
  elif [ "$SYSTEMD" = 1 ]; then
    say "systemd is not running here; once it is: systemctl enable --now cladnet-agent"
  else
    say "start the agent with: $VENV/bin/cladnet-agent run --state-dir $STATE_DIR"
  fi
elif [ "$SYSTEMD" = 1 ]; then
  say "next: CLADNET_JOIN_TOKEN=… $VENV/bin/cladnet-agent join --no-run --controller URL," \
      "then systemctl enable --now cladnet-agent"
fi

if ! command -v wireguard-go >/dev/null 2>&1 && ! [ -d /sys/module/wireguard ] \
   && ! modinfo wireguard >/dev/null 2>&1; then
  echo "install-agent: warning: neither the wireguard kernel module nor wireguard-go" \
       "was found (Debian: apt-get install wireguard-go wireguard-tools)" >&2
fi
