"""Score a text checkpoint the way a client sees it: posts sent as JSON to the real service.

Starts ``python -m app.serve`` on a folder holding only the checkpoint, posts every text of a
folder-per-class tree (for example the later posts of ``temporal_split.py --work W``: ``W/split/val``)
to ``/v1/text/classify`` and reports accuracy, macro-F1, ECE and NLL of the calibrated distributions
the service returns. Posts are read as the training loader reads them (Latin-1 files).

    python benchmarks/text/score_service.py checkpoints/20news-trunk --data runs/temporal/split/val
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.serving.scoring import distribution_metrics, serve_checkpoint  # noqa: E402
from training.text.data import load_text_data  # noqa: E402

REQUEST_BYTES = 256 * 1024  # keeps each request far below the service's JSON body limit


def batches(texts: list[str], most: int) -> list[list[int]]:
    """Indices of ``texts`` in request-sized groups: at most ``most`` texts and about REQUEST_BYTES each."""
    groups: list[list[int]] = [[]]
    size = 0
    for index, text in enumerate(texts):
        if groups[-1] and (len(groups[-1]) == most or size + len(text) > REQUEST_BYTES):
            groups.append([])
            size = 0
        groups[-1].append(index)
        size += len(text)
    return [group for group in groups if group]


def score(checkpoint: Path, data: Path, batch: int, env: dict[str, str] | None = None) -> dict[str, float]:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    dataset = load_text_data(data, manifest["classes"])
    rows: list[list[float]] = []
    with serve_checkpoint(checkpoint, env) as server, httpx.Client(base_url=server.url, timeout=300) as client:
        started = time.perf_counter()
        for group in batches(dataset.texts, batch):
            response = client.post("/v1/text/classify", json={"texts": [dataset.texts[i] for i in group]},
                                   params={"model": manifest["name"], "top_k": 1})
            response.raise_for_status()
            rows.extend([prediction["probabilities"][name] for name in manifest["classes"]]
                        for prediction in response.json()["predictions"])
        seconds = time.perf_counter() - started
    metrics = distribution_metrics(rows, dataset.labels.tolist(), manifest["classes"])
    return {"texts": len(rows), **metrics, "seconds": seconds, "texts_per_s": len(rows) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="folder per class of posts (or .csv / .jsonl)")
    parser.add_argument("--batch", type=int, default=32, help="texts per request (at most the service's 64)")
    parser.add_argument("--output", type=Path, help="write the result as JSON here too")
    args = parser.parse_args()
    result = score(args.checkpoint, args.data, args.batch)
    print(json.dumps(result, indent=2))
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
