#!/bin/sh
# Start Mosquitto with deploy/mosquitto/cladnet.conf in the eclipse-mosquitto image
# (Alpine: POSIX sh, no bash). The config is used as it is, with only its paths
# adapted to the image: the plugin lives in /usr/lib there (Debian: the multiarch
# directory), the data in /mosquitto/data. On first start the dynamic-security file is
# created with the admin user (password from CLADNET_MQTT_ADMIN_PASSWORD), as
# deploy/mosquitto/init-dynsec.sh init does.
#
# The defaults are the image's paths; the tests run this script on the host with:
#   CLADNET_MOSQUITTO_CONF  cladnet.conf to start from     (/cladnet/cladnet.conf)
#   MOSQUITTO_DATA          persistence + dynsec directory  (/mosquitto/data)
#   MOSQUITTO_CONF_OUT      the generated config            (/mosquitto/config/mosquitto.conf)
#   MOSQUITTO_DYNSEC_PLUGIN the plugin                      (/usr/lib/mosquitto_dynamic_security.so)
#   MOSQUITTO_LISTENER      replaces "1883" in `listener 1883` (e.g. "18830 127.0.0.1")
#   MOSQUITTO_USER          if set, `user` line: the user the broker runs as
set -eu
: "${CLADNET_MQTT_ADMIN_PASSWORD:?set CLADNET_MQTT_ADMIN_PASSWORD}"
conf_src="${CLADNET_MOSQUITTO_CONF:-/cladnet/cladnet.conf}"
data="${MOSQUITTO_DATA:-/mosquitto/data}"
conf_out="${MOSQUITTO_CONF_OUT:-/mosquitto/config/mosquitto.conf}"
plugin="${MOSQUITTO_DYNSEC_PLUGIN:-/usr/lib/mosquitto_dynamic_security.so}"
listener="${MOSQUITTO_LISTENER:-1883}"
dynsec="$data/dynamic-security.json"

mkdir -p "$data"
if [ ! -f "$dynsec" ]; then
  (umask 077 && mosquitto_ctrl dynsec init "$dynsec" admin "$CLADNET_MQTT_ADMIN_PASSWORD" >/dev/null)
  [ -s "$dynsec" ] || { echo "mosquitto-start: mosquitto_ctrl did not create $dynsec" >&2; exit 1; }
  echo "mosquitto-start: created $dynsec with the admin user" >&2
fi
# The image's entrypoint hands /mosquitto to the mosquitto user before this runs; the
# file made just now belongs to root, and the broker drops to that user.
if [ -z "${MOSQUITTO_USER:-}" ] && [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
  chown mosquitto:mosquitto "$data" "$dynsec"
fi

{
  if [ -n "${MOSQUITTO_USER:-}" ]; then echo "user $MOSQUITTO_USER"; fi
  sed -e "s|^plugin .*/mosquitto_dynamic_security\.so\$|plugin $plugin|" \
      -e "s|^listener 1883\$|listener $listener|" \
      -e "s|/var/lib/mosquitto/dynamic-security\.json|$dynsec|" \
      -e "s|/var/lib/mosquitto/|$data/|" "$conf_src"
} > "$conf_out"
# cladnet.conf changed in a way this adaptation does not know: stop rather than run
# without the plugin (no authentication) or on the wrong port.
for line in "plugin $plugin" "plugin_opt_config_file $dynsec" "listener $listener" \
            "allow_anonymous false"; do
  grep -qxF "$line" "$conf_out" || {
    echo "mosquitto-start: '$line' missing from $conf_out (made from $conf_src)" >&2
    exit 1
  }
done
exec mosquitto -c "$conf_out"
