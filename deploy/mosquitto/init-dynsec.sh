#!/usr/bin/env bash
# Set up Mosquitto's dynamic security for CLADNet.
#   init-dynsec.sh init FILE                 create FILE with the admin user (password
#                                            from $CLADNET_MQTT_ADMIN_PASSWORD)
#   init-dynsec.sh collector HOST PORT       on a running broker, create the collector
#                                            role and user (password from
#                                            $CLADNET_MQTT_PASSWORD)
# Passwords come from the environment, not arguments, so they stay out of `ps`
# (mosquitto_ctrl itself takes them as arguments; run this on a machine you trust).
set -euo pipefail
# The dynamic-security file holds password hashes: owner-only from the start.
umask 077
: "${CLADNET_MQTT_ADMIN_PASSWORD:?set CLADNET_MQTT_ADMIN_PASSWORD}"
case "${1:-}" in
  init)
    file=${2:?FILE}
    mosquitto_ctrl dynsec init "$file" admin "$CLADNET_MQTT_ADMIN_PASSWORD" >/dev/null
    ;;
  collector)
    : "${CLADNET_MQTT_PASSWORD:?set CLADNET_MQTT_PASSWORD}"
    ctl=(mosquitto_ctrl -h "${2:?HOST}" -p "${3:?PORT}" -u admin -P "$CLADNET_MQTT_ADMIN_PASSWORD" dynsec)
    "${ctl[@]}" createRole cladnet-collector
    "${ctl[@]}" addRoleACL cladnet-collector subscribePattern 'cladnet/metrics/#' allow 5
    # Mosquitto 2.0 checks a shared subscription against its full $share/... topic.
    "${ctl[@]}" addRoleACL cladnet-collector subscribePattern '$share/+/cladnet/metrics/#' allow 5
    # End-to-end acknowledgements back to each host (cladnet/acks/<network>/<host>).
    "${ctl[@]}" addRoleACL cladnet-collector publishClientSend 'cladnet/acks/#' allow 5
    "${ctl[@]}" createClient cladnet-collector -p "$CLADNET_MQTT_PASSWORD"
    "${ctl[@]}" addClientRole cladnet-collector cladnet-collector 5
    ;;
  *) echo "usage: $0 init FILE | collector HOST PORT" >&2; exit 2 ;;
esac
