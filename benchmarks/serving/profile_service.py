"""Where the batched server's time goes under load: py-spy samples of every thread, CPU per process.

Starts the batched server as ``run.py`` does (bundled checkpoints, ``MAX_BATCH_SIZE=32``), drives
it with the same load tool and request bodies at ``--clients`` connections, and meanwhile
* reads each process of the server's tree from ``/proc`` (CPU seconds per wall second: 1.0 is one
  core), which says whether the service process, its tokenizer processes or nothing is the limit;
* samples the service process with py-spy (``--threads``, active threads only), and reports per
  thread its share of the samples and the functions with the most samples beneath them.

A thread that waits for the GIL counts as active where it waits, so a thread that gives the GIL up
often (an eager forward pass) shows up large: that is how the GIL convoys in ``app/tracing.py``
were found. Writes ``OUTPUT.md``. (Not ``profile.py``: a script's folder comes first on ``sys.path``,
where that name hides the standard library's ``profile`` module from ``cProfile``.)

    python benchmarks/serving/profile_service.py --task text --output benchmarks/serving/profile-text
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.settings import Settings
from benchmarks.serving.harness import HERE, ROOT, ServerProcess, drive, pick_tool, write_payload
from benchmarks.serving.run import cpu_model, first_cifar_jpeg, news_posts, pick_model, start_ours

logger = logging.getLogger("profile")


PROJECT_PACKAGES = ("app", "models")  # frames of this project's code, by file path


@dataclasses.dataclass
class ThreadProfile:
    samples: int = 0
    own: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # inclusive
    leaves: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # self


def thread_profiles(raw_lines: Iterable[str]) -> dict[str, ThreadProfile]:
    """py-spy ``--format raw --threads`` lines (``thread (N): NAME;func (file:line);… COUNT``) → per
    thread name: its samples, the samples beneath each function of this project's code (counted once
    per stack), and the samples of each innermost function (where the time is spent or waited)."""
    threads: dict[str, ThreadProfile] = collections.defaultdict(ThreadProfile)
    for line in raw_lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread, *frames = stack.split(";")
        profile = threads[thread.split(": ", 1)[-1]]
        profile.samples += int(count)
        for function in {_short(frame) for frame in frames if _in_project(frame)}:
            profile.own[function] += int(count)
        if frames:
            profile.leaves[_short(frames[-1])] += int(count)
    return threads


def _in_project(frame: str) -> bool:
    path = frame.partition(" (")[2]
    return "site-packages" not in path and any(path.startswith(f"{package}/") or f"/{package}/" in path
                                               for package in PROJECT_PACKAGES)


def _short(frame: str) -> str:
    """``func (/long/path/pkg/file.py:12)`` → ``func (pkg/file.py)``."""
    function, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    return f"{function} ({'/'.join(path.split('/')[-2:])})" if path else function


def cpu_per_process(server: ServerProcess, seconds: float) -> list[tuple[str, float]]:
    """CPU seconds per wall second of every process of the server's tree, over ``seconds``."""
    processes = server.processes()
    before = {process.pid: sum(process.cpu_times()[:2]) for process in processes}
    time.sleep(seconds)
    usage = []
    for process in processes:
        try:
            spent = sum(process.cpu_times()[:2]) - before[process.pid]
            usage.append((" ".join(process.cmdline())[:90], spent / seconds))
        except psutil.NoSuchProcess:
            continue
    return usage


def write_report(output: Path, args: argparse.Namespace, rps: float, usage: list[tuple[str, float]],
                 threads: dict[str, ThreadProfile]) -> None:
    lines = [f"# Where the time goes: batched server, `{args.model}`, {args.clients} clients",
             "", f"{time.strftime('%Y-%m-%d %H:%M')} · {cpu_model()} · {rps:.1f} req/s while sampled "
             f"(py-spy slows the server a little) · `python benchmarks/serving/profile_service.py --task {args.task}`",
             "", "CPU per process of the server's tree (1.0 = one core):", "",
             "| process | CPU |", "| --- | ---: |"]
    lines += [f"| `{command}` | {share:.2f} |" for command, share in usage]
    total = sum(profile.samples for profile in threads.values()) or 1
    lines += ["", "py-spy samples of the service process, per thread (share of all active samples). For each: "
              "the project's functions with the most samples beneath them, and the innermost functions "
              "(where the time is spent, or the GIL waited for), as shares of the thread's samples.", ""]
    for name, profile in sorted(threads.items(), key=lambda item: -item[1].samples):
        if profile.samples < total * 0.02:
            continue
        lines += [f"## {name}: {profile.samples / total:.0%}", "", "| project function (inclusive) | share |",
                  "| --- | ---: |"]
        lines += [f"| `{function}` | {count / profile.samples:.0%} |" for function, count in profile.own.most_common(args.top)]
        lines += ["", "| innermost function | share |", "| --- | ---: |"]
        lines += [f"| `{function}` | {count / profile.samples:.0%} |"
                  for function, count in profile.leaves.most_common(args.top)]
        lines.append("")
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--task", choices=["image", "text"], default="text")
    parser.add_argument("--model", help="model name (default: the task's first model by name)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10, help="seconds of sampling (the load runs longer)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=12, help="functions listed per thread")
    parser.add_argument("--tool", choices=["auto", "wrk", "locust"], default="auto")
    parser.add_argument("--device", default="auto", help="DEVICE of the server (auto: CUDA when present)")
    parser.add_argument("--output", type=Path, default=HERE / "profile")
    args = parser.parse_args(argv)
    args.api_key = ""  # start_ours and drive read it: the profiled server runs without API keys
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed (pip install py-spy, or the project's dev extra)")
    tool = pick_tool(args.tool)
    args.model, _ = pick_model(args.model_dir, args.task, args.model)
    with tempfile.TemporaryDirectory() as scratch:
        if args.task == "image":
            samples, kind = [first_cifar_jpeg(Path(scratch)).read_bytes()], "multipart:files"
        else:
            samples, kind = news_posts(2000, Settings().max_text_chars), "json-text"
        payload = write_payload(samples, kind, Path(scratch))
        server = start_ours("batched", args, Path(scratch), {"MAX_BATCH_SIZE": "32", "MAX_WAIT_MS": "5"})
        try:
            time.sleep(5)  # the tokenizer processes come up after ready
            path = f"/v1/{args.task}/classify"
            drive(tool, server.url, path, payload, args.clients, 3, args.api_key)  # warm the path
            load: dict[str, float] = {}
            loader = threading.Thread(target=lambda: load.update(rps=drive(
                tool, server.url, path, payload, args.clients, args.duration + 6, args.api_key).rps))
            loader.start()
            time.sleep(2)
            raw = Path(scratch) / "profile.txt"
            sampler = subprocess.Popen([py_spy, "record", "--pid", str(server.process.pid), "--duration",
                                        str(round(args.duration)), "--rate", str(args.rate), "--threads",
                                        "--nonblocking", "--format", "raw", "--output", str(raw)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            usage = cpu_per_process(server, args.duration)
            sampler.wait(timeout=args.duration + 60)
            loader.join()
            threads = thread_profiles(raw.read_text().splitlines())
        finally:
            server.stop()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_report(args.output, args, load.get("rps", 0.0), usage, threads)
    logger.info("wrote %s.md", args.output)


if __name__ == "__main__":
    main()
