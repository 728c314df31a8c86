"""The README's "Your own data" examples run as written: real data in the layouts it describes, the
training commands verbatim, then a real service on the models they wrote and the README's requests."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from datakit import extract_news_subset, extract_pairs_subset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "app"))
from servicekit import Server  # noqa: E402

EXAMPLE = re.compile(r"<!-- example: (\w+) -->\n```sh\n(.*?)```", re.S)
TOPICS = ("comp.graphics", "rec.sport.hockey", "sci.med")


def readme_examples() -> dict[str, list[str]]:
    """Each example block's commands: continuation lines joined, comments dropped."""
    blocks = {}
    for name, body in EXAMPLE.findall((ROOT / "README.md").read_text()):
        joined = body.replace("\\\n", " ")
        blocks[name] = [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]
    return blocks


def test_the_readme_has_every_example() -> None:
    assert set(readme_examples()) == {"images", "texts", "pairs", "serve"}


@pytest.fixture(scope="module")
def workdir(cifar_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder: the bundled checkpoints, and data in the README's layouts."""
    work = tmp_path_factory.mktemp("own-data")
    (work / "checkpoints").symlink_to(ROOT / "checkpoints")
    for name in ("cat", "dog", "ship"):
        (work / "my_images" / name).mkdir(parents=True)
        for number, path in enumerate(sorted((cifar_subset / name).iterdir())[:30], start=1):
            shutil.copy(path, work / "my_images" / name / f"{number}.jpg")
    posts = extract_news_subset(tmp_path_factory.mktemp("posts"), per_class=30, classes=TOPICS)
    with (work / "my_texts.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for group in TOPICS:
            writer.writerows([path.read_text(encoding="latin-1"), group] for path in sorted((posts / group).iterdir()))
    pairs = extract_pairs_subset(work / "my_pairs", 150)
    if not (pairs / "images" / "1.jpg").exists():  # the README's request names this photo
        first = json.loads((pairs / "train.jsonl").read_text().splitlines()[0])
        shutil.copy(pairs / first["image"], pairs / "images" / "1.jpg")
    return work


def run_block(commands: list[str], cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "2"}
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                                check=False)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"


@pytest.mark.slow
def test_own_images_texts_and_pairs_train_and_are_served(workdir: Path) -> None:
    examples = readme_examples()
    for name in ("images", "texts", "pairs"):
        run_block(examples[name], workdir)
    plans = {name: json.loads((workdir / "my_models" / name / "manifest.json").read_text())["metrics"]["validation"]
             for name in ("pets", "topics", "moods")}
    assert plans["pets"]["plan"]["calibration_folds"] == 5 and plans["pets"]["accuracy"] > 0.8
    assert plans["topics"]["calibration_folds"] == 5 and plans["topics"]["accuracy"] > 0.8
    assert plans["moods"]["calibration_folds"] == 5 and plans["moods"]["validation_pairs"] == 150

    serve, *requests = examples["serve"]
    model_dir = re.fullmatch(r"MODEL_DIR=(\S+) make serve.*", serve)
    assert model_dir is not None, serve
    server = Server(workdir / "server.log", {"MODEL_DIR": str(workdir / model_dir.group(1))}, shipped=True)
    try:
        server.wait_ready()
        answers = {}
        for request in requests:
            command = request.replace("http://127.0.0.1:8000", server.url)
            result = subprocess.run(["bash", "-c", command], cwd=workdir, capture_output=True, text=True, timeout=60,
                                    check=True)
            answer = json.loads(result.stdout)
            answers[answer["model"]["name"]] = answer["predictions"][0]
    finally:
        server.stop()
    assert set(answers) == {"pets", "topics", "moods"}
    assert answers["pets"]["label"] == "cat"  # my_images/cat/1.jpg, a training image
    assert answers["topics"]["label"] == "rec.sport.hockey"
    for prediction in answers.values():
        assert 0 < prediction["probability"] <= 1
