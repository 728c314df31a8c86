"""The multimodal endpoint under load: batched vs ``MAX_BATCH_SIZE=1``, one real pair per request.

Each request carries one photo and its tweet from the shared paired data (distinct pairs sent in
turn), driven by wrk (locust where wrk is not installed) at each client count; prints requests/s and p50/p99 per configuration and
level (each after a short warm-up run at the same level, as ``run.py`` does: the service builds its
TorchScript forwards and starts its tokenizer processes just after it turns ready), and the
batched/unbatched ratio. The default multimodal model of ``--model-dir`` answers
(the bundled ``mvsa-fusion``: its image encoder, n-gram bag and the MiniLM sentence encoder).

    python benchmarks/serving/multimodal_load.py --data .cache/data/mvsa-pairs-train
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.serving.harness import ROOT, LoadResult, Payload, drive, pick_tool, start_service

BOUNDARY = "----crossmodalbenchPairs"


def pair_payload(data_dir: Path, count: int, directory: Path) -> Payload:
    """The first ``count`` pairs of the manifest as multipart bodies (``files`` + ``texts``), listed for the load tool."""
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()[:count]]
    paths = []
    for number, row in enumerate(rows):
        image = (data_dir / row["image"]).read_bytes()
        body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"photo.jpg\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode() + image + (
                f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"texts\"\r\n\r\n{row['text']}\r\n"
                f"--{BOUNDARY}--\r\n").encode()
        path = directory / f"pair-{number}.bin"
        path.write_bytes(body)
        paths.append(str(path))
    listing = directory / "pairs.list"
    listing.write_text("".join(f"{path}\n" for path in paths))
    return Payload(f"@{listing}", f"multipart/form-data; boundary={BOUNDARY}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the paired data folder (train.jsonl + images/)")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--levels", default="1,8,64")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    parser.add_argument("--pairs", type=int, default=200, help="distinct pairs sent in turn")
    parser.add_argument("--tool", choices=["auto", "wrk", "locust"], default="auto", help="auto: wrk when installed")
    args = parser.parse_args(argv)
    tool = pick_tool(args.tool)
    levels = [int(level) for level in args.levels.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="multimodal-load-"))
    payload = pair_payload(args.data, args.pairs, scratch)
    results: dict[str, dict[int, LoadResult]] = {}
    for name, env in (("batched", {}), ("unbatched", {"MAX_BATCH_SIZE": "1"})):
        server = start_service(name, {"MODEL_DIR": str(args.model_dir), **env}, scratch)
        path = "/v1/multimodal/classify"
        try:
            results[name] = {}
            for clients in levels:
                drive(tool, server.url, path, payload, clients, min(2.0, args.duration))  # warm the path
                results[name][clients] = drive(tool, server.url, path, payload, clients, args.duration)
        finally:
            server.stop()
    print(f"load from {tool}")
    print("| clients | batched req/s | p50 / p99 ms | unbatched req/s | p50 / p99 ms | ratio | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for clients in levels:
        ours, single = results["batched"][clients], results["unbatched"][clients]
        ratio = f"{ours.rps / single.rps:.2f}×" if single.rps else "—"
        print(f"| {clients} | {ours.rps:.1f} | {ours.p50_ms:.0f} / {ours.p99_ms:.0f} | {single.rps:.1f} | "
              f"{single.p50_ms:.0f} / {single.p99_ms:.0f} | {ratio} | {ours.errors + single.errors} |")


if __name__ == "__main__":
    main()
