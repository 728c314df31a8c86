#!/bin/sh
# Container entry point of the serving image: one uvicorn process (one inference worker on the device),
# launched through `python -m app.serve`, the one place that holds the server's connection limits
# (header and body deadlines, header size, concurrent connections, keep-alive; see app/serve.py).
#
# `exec` replaces this shell, so the service is PID 1 and receives SIGTERM directly. The app traps it
# first: /readyz turns 503, queued and running requests finish within DRAIN_TIMEOUT seconds, then the
# signal goes on to uvicorn, which closes what is left within a few seconds and exits. The orchestrator's
# grace period (compose stop_grace_period, Kubernetes terminationGracePeriodSeconds, after any preStop
# pause) must be longer than DRAIN_TIMEOUT plus those seconds (app.serve.SHUTDOWN_AFTER_DRAIN_S).
#
# Arguments are appended to app.serve's: --log-level, --no-access-log, --root-path, --proxy-headers /
# --no-proxy-headers, --forwarded-allow-ips (deploy/README.md); it refuses any other flag.
set -eu

exec python3 -m app.serve --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" "$@"
