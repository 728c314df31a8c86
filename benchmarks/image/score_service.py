"""Score an image checkpoint the way the held-out judge does: JPEG files uploaded to the real service.

Starts ``python -m app.serve`` on a folder holding only the checkpoint, uploads every image of an
ImageFolder tree (or the checkpoint's own validation split of it: the stratified split that
``pretrain-image`` held out, same fraction and seed) to ``/v1/image/classify`` in batches, and
reports accuracy, ECE (15 equal-width bins, as ``training.engine.calibration``) and NLL of the calibrated
distributions the service returns, beside what the manifest claims for the same images. The service
runs the weights in its own precision and path (decoding, bfloat16 autocast on a CPU that has it,
the traced forward), so this is the number a client sees.

    python benchmarks/image/score_service.py runs/fastconv-e35 --data .cache/data/train --split validation
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.serving.scoring import distribution_metrics, serve_checkpoint  # noqa: E402
from training.image.data import _list_image_folder, stratified_split  # noqa: E402


def image_files(data: Path, split: str, fraction: float, seed: int) -> tuple[list[str], list[tuple[Path, int]]]:
    """The class names and (file, label) pairs to score: all of ``data``, or its validation split."""
    classes, files = _list_image_folder(data)
    if split == "validation":
        labels = torch.tensor([label for _, label in files])
        _, held_out = stratified_split(labels, fraction, seed)
        files = [files[int(index)] for index in held_out]
    return classes, files


def score(checkpoint: Path, files: list[tuple[Path, int]], classes: list[str], batch: int) -> dict[str, float]:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    if manifest["classes"] != classes:
        raise SystemExit(f"the checkpoint's classes {manifest['classes']} differ from the folder's {classes}")
    with serve_checkpoint(checkpoint) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        rows: list[list[float]] = []
        started = time.perf_counter()
        for start in range(0, len(files), batch):
            chunk = files[start:start + batch]
            uploads = [("files", (path.name, path.read_bytes(), "image/jpeg")) for path, _ in chunk]
            response = client.post("/v1/image/classify", files=uploads, params={"model": manifest["name"], "top_k": 1})
            response.raise_for_status()
            rows.extend([prediction["probabilities"][name] for name in classes]
                        for prediction in response.json()["predictions"])
        seconds = time.perf_counter() - started
    metrics = distribution_metrics(rows, [label for _, label in files], classes)
    return {"images": len(files), **metrics, "seconds": seconds, "images_per_s": len(files) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder tree of JPEGs (class/image)")
    parser.add_argument("--split", choices=["validation", "all"], default="validation",
                        help="validation: the split pretrain-image held out (--validation-fraction, --seed)")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32, help="images per request")
    parser.add_argument("--output", type=Path, help="write the result as JSON here too")
    args = parser.parse_args()
    classes, files = image_files(args.data, args.split, args.validation_fraction, args.seed)
    result = score(args.checkpoint, files, classes, args.batch)
    claimed = json.loads((args.checkpoint / "manifest.json").read_text())["metrics"].get("validation", {})
    result.update(claimed_accuracy=claimed.get("accuracy", math.nan), claimed_ece=claimed.get("ece", math.nan))
    print(json.dumps(result, indent=2))
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
