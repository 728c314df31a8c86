"""Do two trees serve the same answers? Every bundled model's distributions on fixed inputs, compared.

Run it once per tree (e.g. a ``git worktree`` of the commit before a refactor, then this one): it
starts that tree's service on its ``checkpoints/`` and records, for every loaded model, the
calibrated distributions of the same inputs (JPEGs and posts from the training data, and pairs of
both for multimodal models). ``--compare`` then reports the largest difference per model shared by
both records.

    python benchmarks/serving/same_answers.py --data .cache/data --output /tmp/before.json   # in the old tree
    python benchmarks/serving/same_answers.py --data .cache/data --output /tmp/after.json --compare /tmp/before.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.serving import harness  # noqa: E402

INPUTS_PER_MODEL = 16


def fixed_inputs(data: Path) -> tuple[list[Path], list[str]]:
    """Every 997th image and every 701st post (in sorted order) of the CIFAR-10 and 20 Newsgroups
    training trees: a spread over the classes, the same in every tree."""
    images = sorted((data / "train").glob("*/*.jpg"))[:: 997][:INPUTS_PER_MODEL]
    posts = sorted((data / "20news-bydate-train").glob("*/*"))[:: 701][:INPUTS_PER_MODEL]
    return images, [post.read_text(encoding="latin-1") for post in posts]


def record(data: Path) -> dict[str, list[list[float]]]:
    images, texts = fixed_inputs(data)
    answers: dict[str, list[list[float]]] = {}
    with tempfile.TemporaryDirectory() as log_dir:
        server = harness.start_service("answers", {"MODEL_DIR": str(ROOT / "checkpoints")}, Path(log_dir))
        try:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                for model in client.get("/v1/models").json()["models"]:
                    name, task = model["name"], model["task"]
                    uploads = [("files", (path.name, path.read_bytes(), "image/jpeg")) for path in images]
                    if task == "image":
                        response = client.post("/v1/image/classify", params={"model": name}, files=uploads)
                    elif task == "text":
                        response = client.post("/v1/text/classify", params={"model": name}, json={"texts": texts})
                    else:
                        response = client.post("/v1/multimodal/classify", params={"model": name}, files=uploads,
                                               data={"texts": [text[:2000] for text in texts]})
                    response.raise_for_status()
                    classes = model["classes"]
                    answers[name] = [[p["probabilities"][c] for c in classes] for p in response.json()["predictions"]]
        finally:
            server.stop()
    return answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding train/ (JPEGs) and 20news-bydate-train/")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--compare", type=Path, help="an earlier record to compare with")
    args = parser.parse_args()
    answers = record(args.data)
    args.output.write_text(json.dumps(answers))
    if args.compare is None:
        return 0
    earlier = json.loads(args.compare.read_text())
    worst = 0.0
    for name in sorted(set(answers) | set(earlier)):
        if name not in answers or name not in earlier:
            print(f"{name}: only in {'this' if name in answers else 'the earlier'} record")
            continue
        difference = max(abs(a - b) for row, old in zip(answers[name], earlier[name], strict=True)
                         for a, b in zip(row, old, strict=True))
        worst = max(worst, difference)
        print(f"{name}: {len(answers[name])} inputs, largest probability difference {difference:.2e}")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
