"""Fine-tuning on a user's small data: the learning curve of the adapted recipe, image and text.

Image: ``finetune-image`` from an image checkpoint on three classes at a time (three triples that
cover nine CIFAR-10 classes), with 25 … 200 images per class, scored on other images of those
classes. The images come from the *validation split of the checkpoint's own training run*
(``--image-split-fraction``/``--image-split-seed``, the ``pretrain-image`` defaults), so the backbone
never saw them, as it never saw the held-out test images; with the bundled checkpoint (trained on
every image) pass ``--image-split-fraction 0`` and read the numbers as optimistic.

Text: ``train-text`` (the default n-gram recipe) on three newsgroups at a time, 15 … 120 posts per
class drawn from the earlier 70% of each group (by article number), scored on the latest 30%: later
posts, like the held-out test split.

Each run is the real command line, timed; ``evaluate --json`` scores it. Writes ``OUTPUT.json``,
``OUTPUT.md`` (tables + CPU) and ``OUTPUT.png`` (accuracy and ECE against examples per class).

    python benchmarks/finetune/small_data.py --image-from runs/fastconv-heldout --output benchmarks/finetune/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

IMAGE_TRIPLES = (("cat", "dog", "ship"), ("airplane", "bird", "frog"), ("automobile", "deer", "truck"))
TEXT_TRIPLES = (("comp.graphics", "rec.sport.hockey", "sci.med"),
                ("comp.sys.mac.hardware", "comp.windows.x", "misc.forsale"),
                ("talk.politics.guns", "talk.politics.mideast", "soc.religion.christian"))
IMAGE_SIZES = (25, 50, 100, 200)
TEXT_SIZES = (15, 30, 60, 120)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            return line.split(":", 1)[1].strip() + (" (AVX-512 BF16)" if "avx512_bf16" in flags else " (AVX2)")
    return platform.processor() or "unknown"


def link_folder(target: Path, members: dict[str, list[Path]]) -> Path:
    for name, files in members.items():
        folder = target / name
        folder.mkdir(parents=True, exist_ok=True)
        for path in files:
            (folder / path.name).symlink_to(path.resolve())
    return target


def run_training(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "training", *command], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def evaluate(checkpoint: Path, data: Path) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "training", "evaluate", str(checkpoint), "--data", str(data), "--json"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def train_and_score(task: str, classes: tuple[str, ...], size: int, command: list[str], output: Path,
                    evaluation: Path) -> dict[str, Any]:
    """One timed training command, scored on ``evaluation``; the row of the report (printed too)."""
    seconds = run_training([*command, "--output", str(output)])
    claimed = json.loads((output / "manifest.json").read_text())["metrics"]["validation"]
    scores = evaluate(output, evaluation)
    row = {"task": task, "classes": list(classes), "per_class": size, "seconds": seconds,
           "accuracy": scores["accuracy"], "ece": scores["ece"], "nll": scores["nll"], "eval_count": scores["count"],
           "plan": claimed.get("plan"), "calibration_folds": claimed.get("calibration_folds"),
           "claimed_accuracy": claimed["accuracy"], "claimed_ece": claimed["ece"]}
    print(json.dumps(row), flush=True)
    return row


def image_pools(data: Path, fraction: float, seed: int) -> dict[str, list[Path]]:
    """Per class, the image files of the checkpoint run's validation split (all files when fraction is 0)."""
    import torch

    from training.image.data import IMAGE_SUFFIXES as READABLE
    from training.image.data import stratified_split

    classes = sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(p, index) for index, name in enumerate(classes)
             for p in sorted(q for q in (data / name).iterdir() if q.suffix.lower() in READABLE)]
    if fraction > 0:  # the same split as pretrain-image's: same listing order, labels and seed
        labels = torch.tensor([label for _, label in files])
        _, val_idx = stratified_split(labels, fraction, seed)
        files = [files[i] for i in val_idx.tolist()]
    pools: dict[str, list[Path]] = {name: [] for name in classes}
    for path, label in files:
        pools[classes[label]].append(path)
    return pools


def image_curve(args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    pools = image_pools(args.image_data, args.image_split_fraction, args.image_split_seed)
    rows = []
    for triple in IMAGE_TRIPLES[:args.triples]:
        shuffled = {name: random.Random(f"{name}-{args.seed}").sample(pools[name], len(pools[name])) for name in triple}
        largest = max(args.image_sizes)
        evaluation = link_folder(scratch / f"img-eval-{'-'.join(triple)}",
                                 {name: files[largest:largest + args.eval_per_class] for name, files in shuffled.items()})
        for size in args.image_sizes:
            train = link_folder(scratch / f"img-{'-'.join(triple)}-{size}", {n: f[:size] for n, f in shuffled.items()})
            command = ["finetune-image", "--from", str(args.image_from), "--data", str(train), *args.image_options.split()]
            rows.append(train_and_score("image", triple, size, command, scratch / f"img-out-{'-'.join(triple)}-{size}",
                                        evaluation))
    return rows


def text_pools(data: Path, group: str, early_fraction: float) -> tuple[list[Path], list[Path]]:
    posts = sorted((p for p in (data / group).iterdir() if p.is_file()),
                   key=lambda p: (int(p.name) if p.name.isdigit() else -1, p.name))
    cut = round(len(posts) * early_fraction)
    return posts[:cut], posts[cut:]


def text_curve(args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    rows = []
    for triple in TEXT_TRIPLES[:args.triples]:
        early, late = {}, {}
        for group in triple:
            early[group], late[group] = text_pools(args.text_data, group, 0.7)
            early[group] = random.Random(f"{group}-{args.seed}").sample(early[group], len(early[group]))
        evaluation = link_folder(scratch / f"txt-eval-{'-'.join(triple)}", late)
        for size in args.text_sizes:
            train = link_folder(scratch / f"txt-{'-'.join(triple)}-{size}", {g: p[:size] for g, p in early.items()})
            command = ["train-text", "--data", str(train), *args.text_options.split()]
            rows.append(train_and_score("text", triple, size, command, scratch / f"txt-out-{'-'.join(triple)}-{size}",
                                        evaluation))
    return rows


def summarise(rows: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    sizes = sorted({row["per_class"] for row in rows if row["task"] == task})
    summary = []
    for size in sizes:
        runs = [row for row in rows if row["task"] == task and row["per_class"] == size]
        summary.append({"per_class": size, "runs": len(runs),
                        "accuracy_mean": statistics.mean(r["accuracy"] for r in runs),
                        "accuracy_min": min(r["accuracy"] for r in runs),
                        "ece_mean": statistics.mean(r["ece"] for r in runs), "ece_max": max(r["ece"] for r in runs),
                        "seconds_median": statistics.median(r["seconds"] for r in runs),
                        "seconds_max": max(r["seconds"] for r in runs)})
    return summary


def write_report(rows: list[dict[str, Any]], args: argparse.Namespace, output: Path) -> None:
    lines = ["# Fine-tuning on small data (`benchmarks/finetune/small_data.py`)", "",
             f"CPU: {cpu_name()}, {os.cpu_count()} cores. Command: `{' '.join(sys.argv)}`", ""]
    for task, unit in (("image", "images"), ("text", "posts")):
        summary = summarise(rows, task)
        if not summary:
            continue
        source = f"from `{args.image_from}`" if task == "image" else "n-gram recipe from scratch"
        lines += [f"## {task} ({source}; {args.triples} class triples; accuracy and ECE on unseen {unit})", "",
                  f"| {unit} per class | accuracy mean (min) | ECE mean (max) | wall time median (max) |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {s['per_class']} | {100 * s['accuracy_mean']:.1f}% ({100 * s['accuracy_min']:.1f}%) | "
                  f"{100 * s['ece_mean']:.1f}% ({100 * s['ece_max']:.1f}%) | "
                  f"{s['seconds_median']:.0f} s ({s['seconds_max']:.0f} s) |" for s in summary]
        lines += ["", "| classes | per class | accuracy | ECE | claimed (out-of-fold) accuracy / ECE | seconds |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {', '.join(r['classes'])} | {r['per_class']} | {100 * r['accuracy']:.1f}% | {100 * r['ece']:.1f}% | "
                  f"{100 * r['claimed_accuracy']:.1f}% / {100 * r['claimed_ece']:.1f}% | {r['seconds']:.0f} |"
                  for r in rows if r["task"] == task]
        lines.append("")
    output.with_suffix(".md").write_text("\n".join(lines))


def plot(rows: list[dict[str, Any]], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [task for task in ("image", "text") if any(row["task"] == task for row in rows)]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for task in tasks:
        summary = summarise(rows, task)
        sizes = [s["per_class"] for s in summary]
        axes[0].plot(sizes, [100 * s["accuracy_mean"] for s in summary], marker="o", label=task)
        axes[0].fill_between(sizes, [100 * s["accuracy_min"] for s in summary],
                             [100 * s["accuracy_mean"] for s in summary], alpha=0.2)
        axes[1].plot(sizes, [100 * s["ece_mean"] for s in summary], marker="o", label=task)
    axes[0].set(xscale="log", xlabel="examples per class", ylabel="accuracy on unseen data (%)",
                title="accuracy (mean over the class triples; band: worst)")
    axes[1].set(xscale="log", xlabel="examples per class", ylabel="ECE (%)", title="calibration error (mean)")
    sizes = sorted({row["per_class"] for row in rows})
    for axis in axes:
        axis.set_xticks(sizes, [str(size) for size in sizes])
        axis.minorticks_off()
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(output.with_suffix(".png"), dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-from", type=Path, default=ROOT / "checkpoints" / "cifar10-fastconv")
    parser.add_argument("--image-data", type=Path, default=ROOT / ".cache" / "data" / "train")
    parser.add_argument("--image-split-fraction", type=float, default=0.1,
                        help="the image checkpoint's validation fraction (0: it trained on every image)")
    parser.add_argument("--image-split-seed", type=int, default=0)
    parser.add_argument("--text-data", type=Path, default=ROOT / ".cache" / "data" / "20news-bydate-train")
    parser.add_argument("--tasks", default="image,text")
    parser.add_argument("--image-sizes", type=lambda s: [int(x) for x in s.split(",")], default=list(IMAGE_SIZES))
    parser.add_argument("--text-sizes", type=lambda s: [int(x) for x in s.split(",")], default=list(TEXT_SIZES))
    parser.add_argument("--eval-per-class", type=int, default=300)
    parser.add_argument("--image-options", default="", help="extra finetune-image options, e.g. '--freeze none'")
    parser.add_argument("--text-options", default="", help="extra train-text options")
    parser.add_argument("--seed", type=int, default=0, help="which examples are drawn")
    parser.add_argument("--triples", type=int, default=3, help="how many of the class triples (quick checks: 1)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "finetune" / "results")
    args = parser.parse_args(argv)
    tasks = set(args.tasks.split(","))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="small-data-") as scratch:
        if "image" in tasks:
            rows += image_curve(args, Path(scratch))
        if "text" in tasks:
            rows += text_curve(args, Path(scratch))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps({"cpu": cpu_name(), "command": sys.argv, "rows": rows}, indent=2))
    write_report(rows, args, args.output)
    plot(rows, args.output)
    print(args.output.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
