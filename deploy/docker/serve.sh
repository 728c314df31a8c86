#!/bin/sh
# Container entry point of the serving image: one uvicorn process (one inference worker on the device).
#
# `exec` replaces this shell, so uvicorn is PID 1 and receives SIGTERM directly. The app traps it first:
# /readyz turns 503, queued and running requests finish within DRAIN_TIMEOUT seconds, then the signal goes
# on to uvicorn, which closes the connections and exits. uvicorn's own graceful-shutdown limit is
# DRAIN_TIMEOUT + 5 s, so that it would allow the whole drain even if it saw the signal first. The
# orchestrator's grace period (compose stop_grace_period, Kubernetes terminationGracePeriodSeconds) must
# be longer than that.
set -eu

drain="${DRAIN_TIMEOUT:-30}"
drain_seconds="${drain%%.*}"                # uvicorn takes whole seconds; DRAIN_TIMEOUT may be fractional
case "${drain_seconds}" in
    '' | *[!0-9]*) echo "crossmodal-serve: DRAIN_TIMEOUT must be a number of seconds, not '${drain}'" >&2; exit 2 ;;
esac

exec uvicorn app.main:app \
    --host "${HOST:-0.0.0.0}" \
    --port "${PORT:-8000}" \
    --workers 1 \
    --timeout-graceful-shutdown "$((drain_seconds + 5))" \
    --no-server-header \
    "$@"
