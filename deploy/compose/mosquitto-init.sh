#!/bin/sh
# One-shot set-up of a running CLADNet broker (the compose stack's mosquitto-init):
# the collector role and user, exactly as `deploy/mosquitto/init-dynsec.sh collector`
# makes them, in POSIX sh for the eclipse-mosquitto image (which has no bash).
# Idempotent: creates what is missing, sets the collector's password from the
# environment every time (so a changed CLADNET_MQTT_PASSWORD takes effect), and
# fails unless the result is right (mosquitto_ctrl 2.0 exits 0 even on errors).
#   MQTT_HOST (mosquitto), MQTT_PORT (1883), CLADNET_MQTT_ADMIN_PASSWORD, CLADNET_MQTT_PASSWORD
set -eu
: "${CLADNET_MQTT_ADMIN_PASSWORD:?set CLADNET_MQTT_ADMIN_PASSWORD}"
: "${CLADNET_MQTT_PASSWORD:?set CLADNET_MQTT_PASSWORD}"
host="${MQTT_HOST:-mosquitto}"
port="${MQTT_PORT:-1883}"
role=cladnet-collector
user=cladnet-collector

err="$(mktemp)"
trap 'rm -f "$err"' EXIT
ctl() {
  mosquitto_ctrl -h "$host" -p "$port" -u admin -P "$CLADNET_MQTT_ADMIN_PASSWORD" dynsec "$@" \
    2>"$err" || true
}
has_acl() {  # TYPE TOPIC: does the role have "TYPE : allow : TOPIC"? (getRole's format)
  ctl getRole "$role" | awk -F' : ' -v type="$1" -v topic="$2" '
    { n = split($1, w, " "); sub(/ \(priority.*$/, "", $3) }
    NF >= 3 && w[n] == type && $2 == "allow" && $3 == topic { found = 1 }
    END { exit !found }'
}
has_role() { ctl getClient "$user" | grep -q "[: ]$role (priority"; }
acl() {  # TYPE TOPIC: add it unless the role has it
  if ! has_acl "$1" "$2"; then ctl addRoleACL "$role" "$1" "$2" allow 5 >/dev/null; fi
  has_acl "$1" "$2" || { echo "mosquitto-init: could not add $1 $2 to $role: $(cat "$err")" >&2; exit 1; }
}

tries=0
until ctl listRoles | grep -qx admin; do
  tries=$((tries + 1))
  if [ "$tries" -ge "${MQTT_WAIT:-60}" ]; then
    echo "mosquitto-init: no dynsec admin access to $host:$port:" \
         "$(grep -v -e '^Warning' -e '^This means' -e '^$' "$err")" >&2
    exit 1
  fi
  sleep 1
done

if ! ctl listRoles | grep -qx "$role"; then
  ctl createRole "$role" >/dev/null
fi
acl subscribePattern 'cladnet/metrics/#'
# Mosquitto 2.0 checks a shared subscription against its full $share/... topic.
acl subscribePattern '$share/+/cladnet/metrics/#'
# End-to-end acknowledgements back to each host (cladnet/acks/<network>/<host>).
acl publishClientSend 'cladnet/acks/#'

if ! ctl listClients | grep -qx "$user"; then
  ctl createClient "$user" -p "$CLADNET_MQTT_PASSWORD" >/dev/null
else
  ctl setClientPassword "$user" "$CLADNET_MQTT_PASSWORD" >/dev/null
fi
if ! has_role; then
  ctl addClientRole "$user" "$role" 5 >/dev/null
fi
has_role || { echo "mosquitto-init: could not give $user the role $role: $(cat "$err")" >&2; exit 1; }
echo "mosquitto-init: role and user $user ready on $host:$port"
