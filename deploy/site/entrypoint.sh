#!/bin/sh
# The site container's entrypoint. `serve` (the image's command) checks the settings and
# starts uvicorn as `make serve` does; arguments after it go to uvicorn. Any other
# command (python manage.py ...) runs as given. Either way the command replaces this
# shell (exec), so that `docker stop` signals reach it and uvicorn shuts down gracefully.
set -eu

: "${PROMETHEUS_MULTIPROC_DIR:=/tmp/keyroute-metrics}"
: "${WEB_CONCURRENCY:=2}"
export PROMETHEUS_MULTIPROC_DIR WEB_CONCURRENCY

if [ "${1:-}" = serve ]; then
    shift
    placeholders=$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*change-me.*/\1/p' | sort)
    if [ -n "$placeholders" ]; then
        echo "Keyroute will not start with the example's placeholders: give" \
            $placeholders "real values in deploy/env/site.env." >&2
        exit 1
    fi
    python manage.py check --deploy
    set -- python -m uvicorn platform_site.asgi:application --host 0.0.0.0 --port 8000 \
        --workers "$WEB_CONCURRENCY" --loop uvloop --http httptools --no-access-log \
        --proxy-headers "$@"
fi

# Each worker counts in files there and /metrics adds them all up: the files of the
# container's last run would be added in. Emptied after the check above, whose own
# process leaves files there too.
mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
rm -f "$PROMETHEUS_MULTIPROC_DIR"/*.db

exec "$@"
