"""Serving benchmark: our service (batched and MAX_BATCH_SIZE=1) vs LitServe vs the in-process limit.

Drives each server with an existing load tool (wrk when installed, else locust headless) at each
client count, one image (``--task image``) or one text (``--task text``: a 20 Newsgroups post) per
request, and writes requests/s, p50/p95/p99, time to ready, RSS and a breakdown of where the time
goes (from the service's own metrics) to ``OUTPUT.json`` and ``OUTPUT.md``.

    python benchmarks/serving/run.py --model-dir checkpoints --duration 30
    python benchmarks/serving/run.py --task text --output benchmarks/serving/results-text
    python benchmarks/serving/run.py --model-dir /tmp/ckpts --duration 3 --levels 1,8 --output /tmp/bench  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import random
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.settings import Settings
from benchmarks.serving.harness import (
    HERE,
    ROOT,
    LoadResult,
    Payload,
    ServerProcess,
    drive,
    free_port,
    pick_tool,
    run_locust,
    run_wrk,
    scrape,
    start_service,
    time_breakdown,
    write_payload,
)
from benchmarks.serving.report import write_markdown

logger = logging.getLogger("benchmark")
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg-train.tar.gz"
NEWS = ROOT.parent / "shared" / "data" / "20news-bydate-train.tar.gz"


def first_cifar_jpeg(destination: Path) -> Path:
    with tarfile.open(CIFAR) as tar:
        member = next(m for m in tar if m.isfile() and m.name.endswith(".jpg"))
        handle = tar.extractfile(member)
        assert handle is not None
        path = destination / "image.jpg"
        path.write_bytes(handle.read())
    return path


def news_posts(count: int, max_chars: int, seed: int = 0) -> list[bytes]:
    """Request bodies for the text endpoint: ``count`` distinct real posts of the 20 Newsgroups
    tarball (latin-1 → UTF-8) that the service accepts (at most ``max_chars``), in a seeded random order."""
    with tarfile.open(NEWS) as tar:
        posts = []
        for member in tar:
            handle = tar.extractfile(member) if member.isfile() else None
            text = handle.read().decode("latin-1") if handle is not None else ""
            if 0 < len(text) <= max_chars:
                posts.append(text.encode())
    random.Random(seed).shuffle(posts)
    return posts[:count]


def pick_model(model_dir: Path, task: str, wanted: str | None) -> tuple[str, Path]:
    from app.repository import checkpoint_directories
    from models.checkpoint import read_manifest

    found = {}
    for directory in checkpoint_directories(model_dir):
        manifest = read_manifest(directory)
        if manifest.task == task:
            found[manifest.name] = directory
    if not found:
        raise SystemExit(f"no {task} checkpoint in {model_dir}")
    name = wanted or sorted(found)[0]
    if name not in found:
        raise SystemExit(f"no {task} model {name!r} in {model_dir}; found {sorted(found)}")
    return name, found[name]


def measure_level(server: ServerProcess, path: str, payload: Payload, clients: int, args: argparse.Namespace,
                  tool: str, ours: bool) -> dict[str, Any]:
    """One run of ``clients`` connections against ``server`` (after a short warm-up of the same level)."""
    drive(tool, server.url, path, payload, clients, min(2.0, args.duration), args.api_key)  # warm the path
    before = scrape(server.url) if ours else {}
    load = drive(tool, server.url, path, payload, clients, args.duration, args.api_key)
    run: dict[str, Any] = dataclasses.asdict(load)
    if ours:
        run["breakdown"] = time_breakdown(before, scrape(server.url))
    logger.info("%s, %d clients: %.1f req/s, p50 %.1f ms, p99 %.1f ms, %d errors", server.name, clients,
                load.rps, load.p50_ms, load.p99_ms, load.errors)
    return run


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A level over its rounds: medians of throughput and latency percentiles, summed counts."""
    middle = sorted(runs, key=lambda run: run["rps"])[len(runs) // 2]
    level = {key: statistics.median(run[key] for run in runs) for key in ("rps", "p50_ms", "p95_ms", "p99_ms")}
    level.update(clients=runs[0]["clients"], requests=sum(run["requests"] for run in runs),
                 errors=sum(run["errors"] for run in runs), tool=runs[0]["tool"], runs=runs)
    if "breakdown" in middle:
        level["breakdown"] = middle["breakdown"]  # of the median-throughput run
    return level


def cpu_model() -> str:
    """The CPU's name and its bf16 support: image models run in bf16 only where the CPU has it natively."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    vector = next((label for flag, label in (("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
                   if flag in flags), "no AVX2")
    return f"{name}, {os.cpu_count()} CPUs, {vector}"


def ratio_summary(runs: dict[str, list[dict[str, Any]]], numerator: str, denominator: str) -> dict[str, Any] | None:
    """Per-round throughput ratios (the servers of a round ran minutes apart at most) and their median."""
    if numerator not in runs or denominator not in runs:
        return None
    ratios = [a["rps"] / b["rps"] for a, b in zip(runs[numerator], runs[denominator], strict=True) if b["rps"] > 0]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios} if ratios else None


def half_rate_check(server: ServerProcess, path: str, payload: Payload, best: float, args: argparse.Namespace,
                    tool: str) -> dict[str, Any]:
    clients = max(args.levels)
    paced: LoadResult
    if tool == "wrk":  # paced connections: wrk is C and light, so it leaves the two cores to the server
        paced = run_wrk(server.url + path, payload, clients, args.duration, args.api_key,
                        mean_delay_ms=1000 * clients / (best / 2))
    else:
        paced = run_locust(server.url, path, payload, clients, args.duration, args.api_key,
                           rate_per_user=best / 2 / clients)
    logger.info("%s at half the max rate (%.0f req/s offered, %.1f served): p99 %.1f ms", server.name, best / 2,
                paced.rps, paced.p99_ms)
    return {"target_rps": best / 2, **dataclasses.asdict(paced)}


def bench_servers(servers: dict[str, ServerProcess], payloads: dict[str, Payload], paths: dict[str, str],
                  args: argparse.Namespace, tool: str) -> dict[str, Any]:
    """Every level, ``args.rounds`` times, each round running every server in turn (the order rotating).

    This machine's speed drifts by tens of percent over minutes, so servers measured one after the
    other would compare minutes, not servers; interleaved rounds and per-round ratios do not. Only
    the server being measured runs: the others are paused (SIGSTOP), so idle polling cannot skew it.
    """
    configs = list(servers)
    for server in servers.values():
        server.pause()
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for clients in args.levels:
        runs[clients] = {config: [] for config in configs}
        for round_ in range(args.rounds):
            shift = round_ % len(configs)
            for config in configs[shift:] + configs[:shift]:
                server = servers[config]
                server.resume()
                try:
                    runs[clients][config].append(measure_level(server, paths[config], payloads[config], clients, args,
                                                               tool, config != "litserve"))
                finally:
                    server.pause()
    results: dict[str, Any] = {}
    for config, server in servers.items():
        server.resume()
        levels = [summarise(runs[clients][config]) for clients in args.levels]
        result = {"ready_s": server.ready_s, "memory_ready": server.memory_at_ready, "memory_after_load": server.memory(),
                  "levels": levels}
        if config == "batched" and args.half_rate_check:  # as many paced runs as rounds; the median p99
            best = max(level["rps"] for level in levels)
            checks = [half_rate_check(server, paths[config], payloads[config], best, args, tool)
                      for _ in range(args.rounds)]
            result["half_max_rate"] = {**sorted(checks, key=lambda check: check["p99_ms"])[len(checks) // 2],
                                       "p99_ms_rounds": [check["p99_ms"] for check in checks]}
        results[config] = result
    ratios = {clients: {"vs_unbatched": ratio_summary(runs[clients], "batched", "unbatched"),
                        "vs_litserve": ratio_summary(runs[clients], "batched", "litserve"),
                        "vs_eager": ratio_summary(runs[clients], "batched", "eager")} for clients in args.levels}
    return {"servers": results, "ratios": ratios}


def start_ours(name: str, args: argparse.Namespace, log_dir: Path, extra_env: dict[str, str]) -> ServerProcess:
    env = {"MODEL_DIR": str(args.model_dir), "API_KEYS": args.api_key, "DEVICE": args.device, **extra_env}
    if args.model:
        env[f"DEFAULT_{args.task.upper()}_MODEL"] = args.model
    return start_service(name, env, log_dir)


def start_litserve(checkpoint: Path, args: argparse.Namespace, log_dir: Path) -> ServerProcess:
    port = free_port()
    command = [sys.executable, str(HERE / "litserve_server.py"), str(checkpoint), "--port", str(port),
               "--max-batch-size", str(args.max_batch_size), "--batch-timeout", str(args.max_wait_ms / 1000)]
    return ServerProcess("litserve", command, {}, port, "/health", log_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--task", choices=["image", "text"], default="image", help="what one request carries")
    parser.add_argument("--model", help="model name (default: the task's first model by name)")
    parser.add_argument("--levels", default="1,8,64", help="concurrent clients, comma-separated")
    parser.add_argument("--duration", type=float, default=30, help="seconds of load per level and round")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every level per server, interleaved")
    parser.add_argument("--tool", choices=["auto", "wrk", "locust"], default="auto")
    parser.add_argument("--device", default="auto", help="DEVICE of our servers and the in-process limit "
                                                         "(auto: CUDA when present; LitServe picks its own)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128", help="for the in-process limit")
    parser.add_argument("--configs", default="batched,unbatched,litserve",
                        help="servers to compare, of batched, unbatched, litserve, eager (batched, TRACE_MODELS=false)")
    parser.add_argument("--api-key", default="", help="run our server with this API key and send it")
    parser.add_argument("--no-half-rate-check", dest="half_rate_check", action="store_false",
                        help="skip the paced run at half the best throughput (needs locust)")
    parser.add_argument("--image", type=Path, help="JPEG to send (default: the first CIFAR-10 training image)")
    parser.add_argument("--texts", type=int, default=11_314,
                        help="distinct real posts sent in turn (--task text; default: all of the training split)")
    parser.add_argument("--output", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    tool = pick_tool(args.tool)
    name, checkpoint = pick_model(args.model_dir, args.task, args.model)
    args.model = name
    configs = args.configs.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        if args.task == "image":
            samples = [(args.image or first_cifar_jpeg(Path(scratch))).read_bytes()]
            our_kind, their_kind = "multipart:files", "json-b64"
        else:
            samples = news_posts(args.texts, Settings().max_text_chars)
            our_kind = their_kind = "json-text"
        log_dir = Path(scratch)
        results: dict[str, Any] = {
            "task": args.task, "model": name, "model_dir": str(args.model_dir), "tool": tool, "duration_s": args.duration,
            "levels": args.levels, "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_model(),
                        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": args.rounds, "servers": {},
        }
        from benchmarks.serving.inprocess import measure_limit

        sizes = [int(x) for x in args.batch_sizes.split(",")]
        inputs: Any = samples if args.task == "image" else [sample.decode() for sample in samples]
        results["in_process"] = measure_limit(checkpoint, inputs, sizes, min(3.0, args.duration), args.device)
        logger.info("in-process limit: %.0f items/s at batch %d", results["in_process"]["best_items_per_s"],
                    results["in_process"]["best_batch_size"])
        path = f"/v1/{args.task}/classify"
        batching = {"MAX_BATCH_SIZE": str(args.max_batch_size), "MAX_WAIT_MS": str(args.max_wait_ms)}
        plans = {
            "batched": lambda: start_ours("batched", args, log_dir, batching),
            "unbatched": lambda: start_ours("unbatched", args, log_dir, {"MAX_BATCH_SIZE": "1"}),
            # the batched server with image models run eagerly, not traced (what TRACE_MODELS buys)
            "eager": lambda: start_ours("eager", args, log_dir, {**batching, "TRACE_MODELS": "false"}),
            "litserve": lambda: start_litserve(checkpoint, args, log_dir),
        }
        servers: dict[str, ServerProcess] = {}
        try:
            for config in configs:  # one at a time, the others paused: ready time and memory measured alone
                for other in servers.values():
                    other.pause()
                servers[config] = plans[config]()
                servers[config].memory_at_ready = servers[config].memory()
            payloads = {config: write_payload(samples, their_kind if config == "litserve" else our_kind, log_dir)
                        for config in configs}
            paths = {config: "/predict" if config == "litserve" else path for config in configs}
            results.update(bench_servers(servers, payloads, paths, args, tool))
        finally:
            for server in servers.values():
                server.resume()
                server.stop()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args.output.with_suffix(".md"))
    logger.info("wrote %s.json and %s.md", args.output, args.output)


if __name__ == "__main__":
    main()
