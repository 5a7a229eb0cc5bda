#!/bin/sh
# Runs one service as a bus worker: `<service> serve`. Extra arguments are passed to serve.
set -eu
: "${DIFFRACTFLOW_SERVICE:?DIFFRACTFLOW_SERVICE must name the service}"
exec "$DIFFRACTFLOW_SERVICE" serve "$@"
