#!/usr/bin/env bash
# The main job on one machine: set up, start a local etcd and the controller, create a
# network, join a fake agent with curl and show its peers. Ctrl-C stops everything.
#   --exit   stop after the walk-through instead of keeping the controller running
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh

VENV="${CLADNET_VENV:-.venv}"
STATE="${CLADNET_DEMO_STATE:-$PWD/.state}"
ETCD_PORT="${ETCD_PORT:-23790}"
API_PORT="${API_PORT:-8470}"
API="http://127.0.0.1:$API_PORT"
mkdir -p "$STATE"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

echo "==> etcd on 127.0.0.1:$ETCD_PORT (data in $STATE/etcd)"
etcd --name cl-demo --data-dir "$STATE/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-cluster "cl-demo=http://127.0.0.1:$((ETCD_PORT + 1))" \
  --log-level warn --logger zap 2>"$STATE/etcd.log" &
pids+=($!)

MQTT_PORT="${MQTT_PORT:-18830}"
COLLECTOR_PORT="${COLLECTOR_PORT:-8471}"
SECRETS="$STATE/secrets.env"
if [ ! -f "$SECRETS" ]; then
  umask 077
  printf 'CLADNET_MQTT_ADMIN_PASSWORD=%s\nCLADNET_MQTT_PASSWORD=%s\nCLADNET_COLLECTOR_TOKEN=%s\n' \
    "$(head -c 18 /dev/urandom | base64)" "$(head -c 18 /dev/urandom | base64)" \
    "$(head -c 18 /dev/urandom | base64)" > "$SECRETS"
  umask 022
fi
set -a; . "$SECRETS"; set +a

echo "==> Mosquitto on 127.0.0.1:$MQTT_PORT (dynamic security, per-host users)"
mkdir -p "$STATE/mosquitto"
[ -f "$STATE/mosquitto/dynamic-security.json" ] || \
  bash deploy/mosquitto/init-dynsec.sh init "$STATE/mosquitto/dynamic-security.json"
sed -e "s|^listener 1883|listener $MQTT_PORT 127.0.0.1|" \
    -e "s|/var/lib/mosquitto/dynamic-security.json|$STATE/mosquitto/dynamic-security.json|" \
    -e "s|/var/lib/mosquitto/|$STATE/mosquitto/|" deploy/mosquitto/cladnet.conf \
  | { echo "user $(id -un)"; cat; } > "$STATE/mosquitto/mosquitto.conf"
mosquitto -c "$STATE/mosquitto/mosquitto.conf" 2>"$STATE/mosquitto.log" &
pids+=($!)
for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/$MQTT_PORT) 2>/dev/null && break; sleep 0.1; done
if [ ! -f "$STATE/mosquitto/.collector" ]; then
  bash deploy/mosquitto/init-dynsec.sh collector 127.0.0.1 "$MQTT_PORT" >/dev/null 2>&1 || true
  touch "$STATE/mosquitto/.collector"
fi

echo "==> collector on http://127.0.0.1:$COLLECTOR_PORT (SQLite in $STATE/collector)"
"$VENV/bin/cladnet-collector" --mqtt-url "mqtt://127.0.0.1:$MQTT_PORT" --mqtt-user cladnet-collector \
  --listen "127.0.0.1:$COLLECTOR_PORT" --state-dir "$STATE/collector" 2>"$STATE/collector.log" &
pids+=($!)

echo "==> controller on $API (log in $STATE/controller.log)"
CLADNET_MQTT_URL="mqtt://127.0.0.1:$MQTT_PORT" CLADNET_COLLECTOR_URL="http://127.0.0.1:$COLLECTOR_PORT" \
"$VENV/bin/cladnet-controller" --etcd "http://127.0.0.1:$ETCD_PORT" --listen "127.0.0.1:$API_PORT" \
  --state-dir "$STATE/controller" 2>"$STATE/controller.log" &
pids+=($!)
for _ in $(seq 100); do curl -fs "$API/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fs "$API/readyz" >/dev/null || { echo "controller did not start; see $STATE/controller.log"; exit 1; }

TOKEN="$(cat "$STATE/controller/admin-token")"
AUTH=(-H "Authorization: Bearer $TOKEN")
echo "==> admin token in $STATE/controller/admin-token"

echo "==> free private address space for 50 hosts"
curl -fs "${AUTH[@]}" "$API/v1/address-spaces?hosts=50" | "$VENV/bin/python" -c \
  'import json,sys; d=json.load(sys.stdin); print("   recommended:", d["recommended"]); [print("  ", b["block"], "free:", ", ".join(b["free"][:4]), "…" if len(b["free"])>4 else "") for b in d["blocks"]]'

echo "==> create network 'demo'"
curl -fs "${AUTH[@]}" -X POST "$API/v1/networks" -H 'Content-Type: application/json' \
  -d '{"name":"demo","expected_hosts":50}' -o "$STATE/net.json" \
  || curl -fs "${AUTH[@]}" "$API/v1/networks/demo" -o "$STATE/net.json"
cat "$STATE/net.json"; echo

echo "==> join token, and a fake agent joining with curl"
JOIN="$(curl -fs "${AUTH[@]}" -X POST "$API/v1/networks/demo/tokens" -H 'Content-Type: application/json' \
  -d '{"ttl_seconds":3600}' | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["token"])')"
PUB="$("$VENV/bin/python" -c 'from cladnet.keys import generate_keypair; print(generate_keypair()[1])')"
curl -fs -X POST "$API/v1/join" -H 'Content-Type: application/json' \
  -d "{\"token\":\"$JOIN\",\"hostname\":\"fake-vm-$$\",\"public_key\":\"$PUB\",\"addresses\":[\"192.168.77.10/24\"],\"labels\":{\"cloud\":\"demo\"}}" \
  | "$VENV/bin/python" -c 'import json,sys; d=json.load(sys.stdin); print("   host", d["host_id"], "got", d["overlay_ip"], "seen from", d["observed_address"])'

echo "==> peers of 'demo'"
curl -fs "${AUTH[@]}" "$API/v1/networks/demo/peers" | "$VENV/bin/python" -m json.tool

echo "==> the fake agent's broker user (it may publish only to its own topic)"
CRED="$(curl -fs -X POST "$API/v1/join" -H 'Content-Type: application/json' \
  -d "{\"token\":\"$JOIN\",\"hostname\":\"fake-vm-$$\",\"public_key\":\"$PUB\"}" \
  | "$VENV/bin/python" -c 'import json,sys; d=json.load(sys.stdin); print(d["host_id"], d["credential"])')"
curl -fs -X POST -H "Authorization: Bearer ${CRED#* }" "$API/v1/hosts/${CRED%% *}/metrics-credentials" \
  | "$VENV/bin/python" -c 'import json,sys; d=json.load(sys.stdin); print("  ", d["broker"], "user", d["username"], "topic", d["topic"])'

if [ "${1:-}" = "--exit" ]; then exit 0; fi
echo "==> running. Try:  curl -N -H 'Authorization: Bearer $TOKEN' '$API/v1/networks/demo/peers?watch=true'"
echo "    Ctrl-C to stop."
wait
