#!/bin/sh
# The proxy container's entrypoint: refuses to start the proxy with the example's
# placeholders, then runs the command in its place (exec), so that signals reach it.
set -eu

if [ "${1:-}" = litellm ]; then
    placeholders=$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*change-me.*/\1/p' | sort)
    if [ -n "$placeholders" ]; then
        echo "The proxy will not start with the example's placeholders: give" \
            $placeholders "real values in deploy/env/litellm.env." >&2
        exit 1
    fi
fi

exec "$@"
