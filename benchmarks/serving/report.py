"""The benchmark's markdown report: throughput and latency per configuration, targets, where the time goes."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _ratio(summary: dict[str, Any] | None) -> str:
    """The median of the per-round ratios, with their range."""
    if not summary:
        return "n/a"
    return f"{summary['median']:.2f}× (rounds {summary['min']:.2f}–{summary['max']:.2f}×)"


def write_markdown(results: dict[str, Any], path: Path) -> None:
    limit = results["in_process"]
    item = "texts" if results.get("task") == "text" else "images"
    preparing = "tokenising" if item == "texts" else "decoding"
    rounds = results.get("rounds", 1)
    lines = [
        f"# Serving benchmark: `{results['model']}`", "",
        f"{results['started']} · tool: {results['tool']} · {results['duration_s']:g} s per level and round, "
        f"{rounds} interleaved rounds (servers in turn, the idle ones paused) · one {item[:-1]} per "
        f"request · MAX_BATCH_SIZE={results['max_batch_size']}, MAX_WAIT_MS={results['max_wait_ms']:g} · "
        f"{results['machine']['platform']}" + (f" · {results['machine']['cpu']}" if results["machine"].get("cpu") else "")
        + (f" · GPU: {results['machine']['gpu']}" if results["machine"].get("gpu") else ""), "",
        "Medians over the rounds; req/s of each round in the last column.", "",
        "| server | clients | req/s | p50 ms | p95 ms | p99 ms | errors | rounds (req/s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for config, server in results["servers"].items():
        for level in server["levels"]:
            each = ", ".join(f"{run['rps']:.0f}" for run in level.get("runs", []))
            lines.append(f"| {config} | {level['clients']} | {level['rps']:.1f} | {level['p50_ms']:.1f} | "
                         f"{level['p95_ms']:.1f} | {level['p99_ms']:.1f} | {level['errors']} | {each} |")
    lines += [
        "", f"In-process limit (same code path, no HTTP): **{limit['best_items_per_s']:.0f} {item}/s** at batch size "
        f"{limit['best_batch_size']} on {limit['device']} ({limit['torch_threads']} torch threads); {preparing} alone "
        f"{limit['decode_images_per_s_one_thread']:.0f} {item}/s on one thread.", "",
        "| batch size | " + " | ".join(str(k) for k in limit["items_per_s_by_batch_size"]) + " |",
        "| --- | " + " | ".join("---:" for _ in limit["items_per_s_by_batch_size"]) + " |",
        f"| {item}/s | " + " | ".join(f"{v:.0f}" for v in limit["items_per_s_by_batch_size"].values()) + " |", "",
        "Memory: PSS of the server's whole process tree (shared pages split among the processes that map "
        "them) and the main process's RSS.", "",
        "| server | time to ready (s) | processes | PSS ready (MB) | PSS after load (MB) | main RSS after load (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for config, server in results["servers"].items():
        ready, after = server["memory_ready"], server["memory_after_load"]
        lines.append(f"| {config} | {server['ready_s']:.2f} | {after['processes']} | {ready['pss_total_mb']:.0f} | "
                     f"{after['pss_total_mb']:.0f} | {after['rss_main_mb']:.0f} |")
    top = max(results["levels"])
    ratios = results.get("ratios", {}).get(top) or results.get("ratios", {}).get(str(top)) or {}
    lines += ["", f"## Targets at {top} clients", "",
              f"- batched vs MAX_BATCH_SIZE=1: {_ratio(ratios.get('vs_unbatched'))} (target ≥ 3×)",
              f"- batched vs LitServe: {_ratio(ratios.get('vs_litserve'))} (target ≥ 1×)"]
    if ratios.get("vs_eager"):
        lines.append(f"- batched (traced) vs the same server with TRACE_MODELS=false: {_ratio(ratios['vs_eager'])}")
    half = results["servers"].get("batched", {}).get("half_max_rate")
    if half:
        each = ", ".join(f"{p99:.0f}" for p99 in half.get("p99_ms_rounds", []))
        lines.append(f"- p99 at half the best throughput ({half['target_rps']:.0f} req/s offered, {half['rps']:.0f} "
                     f"served): {half['p99_ms']:.0f} ms, the median of paced runs with {each} ms (target ≤ 250 ms)")
    batched_server = results["servers"].get("batched")
    if batched_server:
        lines.append(f"- time to ready: {batched_server['ready_s']:.2f} s (target ≤ 5 s); memory "
                     f"{batched_server['memory_after_load']['pss_total_mb']:.0f} MB PSS in all (target ≤ 1536 MB)")
    lines += ["", "## Where the time goes (batched server, means from its /metrics)", "",
              "| clients | mean batch | decode ms/request | queue wait ms/item | compute ms/batch | server latency ms |",
              "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for level in (batched_server or {}).get("levels", []):
        b = level.get("breakdown", {})
        if b:
            lines.append(f"| {level['clients']} | {b['mean_batch_size']:.1f} | {b['preprocess_ms']:.2f} | "
                         f"{b['queue_wait_ms']:.2f} | {b['batch_compute_ms']:.2f} | {b['server_latency_ms']:.2f} |")
    path.write_text("\n".join(lines) + "\n")
