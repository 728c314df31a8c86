"""Image training benchmark: the seed recipe and the default recipe, side by side in one run.

Each recipe runs the real CLI (``python -m training pretrain-image``) in a subprocess on the same
data and split; we record wall time (the whole command: decoding, training, calibration, writing)
and the validation metrics from the manifest, and optionally score each checkpoint on a held-out
folder (``--test-data``, e.g. the CIFAR-10 test split as an ImageFolder tree).

    python benchmarks/image/train_recipes.py --data .cache/data/train --recipes lenet fastconv

``airbench94`` (``benchmarks/image/airbench94.py``, the efficiency reference) runs for as long as the
recipe before it took, wall clock on the same machine, so the two compare at equal CPU time:

    python benchmarks/image/train_recipes.py --data .cache/data/train --recipes fastconv airbench94
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.serving.run import cpu_model  # noqa: E402

RECIPES = {
    # The seed's recipe: LeNet, SGD lr 1e-3 (momentum 0.9), batch 100, 10 epochs, no augmentation tricks.
    "lenet": ["--arch", "lenet"],
    # The default: fastconv, 13 epochs, batch 512, Nesterov SGD, label smoothing, flip-TTA.
    "fastconv": ["--arch", "fastconv"],
    # The transfer source (modality-agnostic trunk), not the served default.
    "trunk": ["--arch", "trunk"],
}


def run_recipe(name: str, data: Path, output_dir: Path, test_data: Path | None) -> dict[str, object]:
    output = output_dir / f"bench-{name}"
    command = [sys.executable, "-m", "training", "pretrain-image", "--data", str(data), "--output", str(output),
               *RECIPES[name]]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    seconds = time.perf_counter() - started
    manifest = json.loads((output / "manifest.json").read_text())
    validation = manifest["metrics"]["validation"]
    row: dict[str, object] = {
        "recipe": name, "wall_seconds": round(seconds, 1), "train_seconds": round(validation["train_seconds"], 1),
        "val_accuracy": validation["accuracy"], "val_macro_f1": validation["macro_f1"],
        "ece_before": manifest["calibration"]["ece_before"], "ece_after": manifest["calibration"]["ece_after"],
        "command": " ".join(command[1:]),
    }
    if test_data is not None:
        result = subprocess.run([sys.executable, "-m", "training", "evaluate", str(output), "--data", str(test_data), "--json"],
                                cwd=ROOT, check=True, capture_output=True, text=True)
        test = json.loads(result.stdout)
        row.update(test_accuracy=test["accuracy"], test_ece=test["ece"])
    return row


def run_airbench(data: Path, output_dir: Path, budget_seconds: float | None) -> dict[str, object]:
    output = output_dir / "bench-airbench94.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "image" / "airbench94.py"), "--data", str(data),
               "--output", str(output)]
    if budget_seconds is not None:
        command += ["--budget-seconds", str(round(budget_seconds))]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    result = json.loads(output.read_text())
    return {"recipe": "airbench94", "wall_seconds": round(time.perf_counter() - started, 1),
            "train_seconds": result["history"][-1]["seconds"], "val_accuracy": result["val_accuracy"],
            "val_accuracy_without_tta": result["val_accuracy_without_tta"], "epochs": result["epochs"],
            "command": " ".join(command[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--test-data", type=Path)
    parser.add_argument("--recipes", nargs="+", default=["lenet", "fastconv"], choices=[*sorted(RECIPES), "airbench94"])
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "image_training.md")
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    for name in args.recipes:
        if name == "airbench94":  # as long as the recipe before it took: equal CPU time
            budget = float(cast(float, rows[-1]["wall_seconds"])) if rows else None
            rows.append(run_airbench(args.data, args.output_dir, budget))
        else:
            rows.append(run_recipe(name, args.data, args.output_dir, args.test_data))
    if len(rows) >= 2 and rows[-1]["recipe"] == "airbench94":
        ratio = float(cast(float, rows[-2]["val_accuracy"])) / float(cast(float, rows[-1]["val_accuracy"]))
        rows[-2]["accuracy_vs_airbench94"] = round(ratio, 4)
    columns = list(dict.fromkeys(c for row in rows for c in row if c != "command"))
    lines = [f"CPU: {cpu_model()}; one recipe after the other, nothing else running.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = (row.get(c, "") for c in columns)
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in cells) + " |")
    lines += ["", "Commands:", *[f"- `{row['command']}`" for row in rows]]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")
    args.results.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
