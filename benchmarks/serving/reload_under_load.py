"""Reloads under load: wrk on one model for N seconds, without and then with reloads in the middle of the run.

Copies one checkpoint (by default the task's first bundled model) into a scratch ``MODEL_DIR``, starts
the service as it ships (``python -m app.serve``) with an ``ADMIN_TOKEN``, and runs wrk twice on that
server for the same length: once untouched, once while the model is reloaded every ``--every``
seconds from the first interval to the last (``--how sighup``: its weights file touched, so the
rescan sees a change, then SIGHUP; ``--how admin``: ``POST /admin/models/NAME/load``). Prints requests,
errors (must be 0), req/s, p50 and p99 of both side by side (and writes them with ``--output``); exits
non-zero when a request failed or a reload did not happen.

    python benchmarks/serving/reload_under_load.py --task image --seconds 30
    python benchmarks/serving/reload_under_load.py --task text --how admin --seconds 30 --output /tmp/reload-text
    python benchmarks/serving/reload_under_load.py --seconds 5  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.serving.harness import ROOT, LoadResult, ServerProcess, run_wrk, start_service, write_payload
from benchmarks.serving.run import first_cifar_jpeg, news_posts, pick_model
from models.checkpoint import WEIGHTS_FILE

logger = logging.getLogger("benchmark")
RELOADS = "crossmodal_model_reloads_total"


@dataclasses.dataclass
class Reloads:
    """What the reloading thread did: reloads asked for, and those the service reports loaded or failed."""

    asked: int = 0
    loaded: int = 0
    failed: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)


def trigger_reloads(server: ServerProcess, checkpoint: Path, how: str, token: str, every: float, seconds: float,
                    reloads: Reloads) -> None:
    """Ask for a reload every ``every`` s from ``every`` to ``seconds - every`` after now (the middle of the run)."""
    started = time.monotonic()
    moment = every
    while moment <= seconds - every:
        time.sleep(max(0.0, started + moment - time.monotonic()))
        reloads.asked += 1
        if how == "sighup":
            os.utime(checkpoint / WEIGHTS_FILE)  # a new modification time: the rescan sees a changed checkpoint
            os.kill(server.process.pid, signal.SIGHUP)
        else:
            response = httpx.post(f"{server.url}/admin/models/{checkpoint.name}/load", timeout=60,
                                  headers={"Authorization": f"Bearer {token}"})
            if response.status_code != 200:
                reloads.problems.append(f"{response.status_code}: {response.text[:200]}")
        moment += every


def outcome_count(url: str, directory: str, outcome: str) -> int:
    """``crossmodal_model_reloads_total`` of ``directory`` and ``outcome`` (0 before the first)."""
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == RELOADS and sample.labels == {"directory": directory, "outcome": outcome}:
                return int(sample.value)
    return 0


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    name, source = pick_model(args.model_dir, args.task, args.model)
    model_dir = scratch / "models"
    checkpoint = model_dir / source.name
    shutil.copytree(source, checkpoint)
    if args.task == "image":
        payload = write_payload([first_cifar_jpeg(scratch).read_bytes()], "multipart:file", scratch)
    else:
        payload = write_payload(news_posts(64, 4000), "json-text", scratch)
    url_path = f"/v1/{args.task}/classify?model={name}"
    token = secrets.token_urlsafe(24)
    server = start_service("reload-bench", {"MODEL_DIR": str(model_dir), "ADMIN_TOKEN": token}, scratch)
    try:
        logger.info("%s ready in %.1f s; warming the path up for %g s", name, server.ready_s, args.warmup)
        # past readiness the TorchScript forward is still being built and the tokenizer processes started:
        # the first run must not pay for them
        run_wrk(server.url + url_path, payload, args.clients, args.warmup)
        logger.info("%d connections, %g s without reloads", args.clients, args.seconds)
        steady = run_wrk(server.url + url_path, payload, args.clients, args.seconds)
        reloads = Reloads()
        before = {outcome: outcome_count(server.url, checkpoint.name, outcome) for outcome in ("loaded", "failed")}
        thread = threading.Thread(target=trigger_reloads, args=(server, checkpoint, args.how, token, args.every,
                                                                args.seconds, reloads))
        logger.info("%d connections, %g s with a reload (%s) every %g s", args.clients, args.seconds, args.how,
                    args.every)
        thread.start()
        reloading = run_wrk(server.url + url_path, payload, args.clients, args.seconds)
        thread.join()
        time.sleep(1.0)  # a SIGHUP's reload may finish just after the run
        reloads.loaded = outcome_count(server.url, checkpoint.name, "loaded") - before["loaded"]
        reloads.failed = outcome_count(server.url, checkpoint.name, "failed") - before["failed"]
    finally:
        server.stop()
    return {"model": name, "task": args.task, "clients": args.clients, "seconds": args.seconds, "how": args.how,
            "every_s": args.every, "without_reloads": dataclasses.asdict(steady),
            "with_reloads": dataclasses.asdict(reloading), "reloads": dataclasses.asdict(reloads)}


def table(result: dict[str, Any]) -> str:
    rows = ["| run | requests | errors | req/s | p50 ms | p99 ms | reloads |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    reloads = result["reloads"]
    for label, key, done in (("without reloads", "without_reloads", "0"),
                             ("with reloads", "with_reloads", f"{reloads['loaded']} of {reloads['asked']}")):
        load = LoadResult(**result[key])
        rows.append(f"| {label} | {load.requests:,} | {load.errors} | {load.rps:.1f} | {load.p50_ms:.1f} | "
                    f"{load.p99_ms:.1f} | {done} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--task", choices=["image", "text"], default="image", help="what one request carries")
    parser.add_argument("--model", help="model name (default: the task's first model by name)")
    parser.add_argument("--seconds", type=float, default=30, help="length of each of the two runs")
    parser.add_argument("--clients", type=int, default=64, help="wrk connections")
    parser.add_argument("--warmup", type=float, default=10, help="seconds of load before the first run")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between two reloads")
    parser.add_argument("--how", choices=["sighup", "admin"], default="sighup", help="how a reload is asked for")
    parser.add_argument("--output", type=Path, help="write OUTPUT.json and OUTPUT.md")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    if args.seconds < 2 * args.every:
        raise SystemExit(f"--seconds must be at least twice --every ({args.every:g}) for a reload in the middle")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="reload-bench-") as scratch:
        result = run(args, Path(scratch))
    report = table(result)
    print(f"\n{result['model']} ({result['task']}), {args.clients} connections, {args.seconds:g} s each, "
          f"a reload ({args.how}) every {args.every:g} s in the second run:\n\n{report}\n")
    reloads = result["reloads"]
    if reloads["problems"]:
        print("reload problems:", *reloads["problems"], sep="\n  ")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.output.with_suffix(".md").write_text(report + "\n")
    failed = (result["with_reloads"]["errors"] or result["without_reloads"]["errors"] or reloads["failed"]
              or reloads["problems"] or reloads["loaded"] < 1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
