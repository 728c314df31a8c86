"""The serving benchmark itself runs: real servers (ours batched and unbatched, LitServe), a real load tool."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from benchmarks.serving.run import CIFAR, NEWS

ROOT = Path(__file__).resolve().parents[2]
SENT_FROM = {"image": CIFAR, "text": NEWS}  # the shared archive the benchmark takes its real image or posts from


@pytest.mark.parametrize("task", ["image", "text"])
def test_serving_benchmark_measures_every_server_without_errors(task: str, model_dir: Path, tmp_path: Path) -> None:
    if not SENT_FROM[task].is_file():
        pytest.skip(f"shared data missing: {SENT_FROM[task]}")
    output = tmp_path / f"bench-{task}"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving" / "run.py"), "--model-dir", str(model_dir),
                    "--task", task, "--duration", "1", "--levels", "1,4", "--batch-sizes", "1,4", "--rounds", "2",
                    "--output", str(output)], check=True, cwd=ROOT, timeout=300)
    results = json.loads(output.with_suffix(".json").read_text())
    assert results["task"] == task and set(results["servers"]) == {"batched", "unbatched", "litserve"}
    for server in results["servers"].values():
        assert [level["clients"] for level in server["levels"]] == [1, 4]
        assert all(level["requests"] > 0 and level["errors"] == 0 for level in server["levels"])
        assert all(len(level["runs"]) == 2 for level in server["levels"])  # interleaved rounds
        assert server["memory_after_load"]["pss_total_mb"] > 0
    assert results["ratios"]["4"]["vs_unbatched"]["median"] > 0 and len(results["ratios"]["4"]["vs_litserve"]["rounds"]) == 2
    paced = results["servers"]["batched"]["half_max_rate"]
    assert paced["requests"] > 0 and paced["errors"] == 0
    assert results["in_process"]["best_items_per_s"] > 0
    assert "Targets at 4 clients" in output.with_suffix(".md").read_text()
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(model_dir) in " ".join(p.info["cmdline"] or [])]
    assert left == [], "a server process outlived the benchmark (it would skew the next measurement)"


def test_profile_reports_cpu_per_process_and_samples_per_thread(model_dir: Path, tmp_path: Path) -> None:
    if not NEWS.is_file():
        pytest.skip(f"shared data missing: {NEWS}")
    output = tmp_path / "profile-text"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving" / "profile_service.py"), "--model-dir", str(model_dir),
                    "--task", "text", "--clients", "8", "--duration", "2", "--output", str(output)],
                   check=True, cwd=ROOT, timeout=300)
    report = output.with_suffix(".md").read_text()
    assert "| `" in report and "app.serve" in report  # the service process's CPU
    assert "## MainThread" in report and "## infer-" in report  # the event loop and the inference thread sampled
    assert "InferenceWorker.compute (app/worker.py)" in report


def test_profile_counts_samples_per_thread_inclusive_for_project_code_and_by_innermost_function() -> None:
    from benchmarks.serving.profile_service import thread_profiles

    raw = ["thread (1): MainThread;run (asyncio/runners.py:118);classify (app/routes/deps.py:84);"
           "parse_qsl (urllib/parse.py:700) 3",
           "thread (1): MainThread;run (asyncio/runners.py:118);classify (app/routes/deps.py:90) 2",
           "thread (2): infer-cpu_0;compute (/srv/app/worker.py:250);forward (/x/site-packages/app/m.py:1) 5",
           "not a sample line"]
    threads = thread_profiles(raw)
    main, infer = threads["MainThread"], threads["infer-cpu_0"]
    assert main.samples == 5 and main.own["classify (routes/deps.py)"] == 5  # one function, two lines
    assert main.leaves == {"parse_qsl (urllib/parse.py)": 3, "classify (routes/deps.py)": 2}
    assert infer.samples == 5 and dict(infer.own) == {"compute (app/worker.py)": 5}  # site-packages is not ours


def test_multimodal_load_benchmark_runs_both_configurations(tmp_path: Path) -> None:
    """benchmarks/serving/multimodal_load.py against a tiny fusion model with a sentence encoder."""
    import io

    from PIL import Image
    from servicekit import save_fusion_model

    models = tmp_path / "models"
    save_fusion_model(models, "tiny-fusion-sentence", "fusion_late", sentence=True)
    pairs = tmp_path / "pairs"
    (pairs / "images").mkdir(parents=True)
    lines = []
    for number, (colour, text) in enumerate([("red", "best day ever"), ("blue", "stuck in traffic again"),
                                              ("green", "the meeting is at noon")]):
        buffer = io.BytesIO()
        Image.new("RGB", (48, 40), colour).save(buffer, "JPEG")
        (pairs / "images" / f"{number}.jpg").write_bytes(buffer.getvalue())
        lines.append(json.dumps({"id": str(number), "image": f"images/{number}.jpg", "text": text, "label": "positive"}))
    (pairs / "train.jsonl").write_text("\n".join(lines) + "\n")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving" / "multimodal_load.py"), "--data",
                             str(pairs), "--model-dir", str(models), "--levels", "1,4", "--duration", "3"],
                            check=False, cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| 1 ") or line.startswith("| 4 ")]
    assert len(rows) == 2, result.stdout
    for row in rows:
        assert float(row[2]) > 0 and float(row[4]) > 0 and row[7].strip() == "0", row  # both served, no errors


def test_reload_benchmark_reloads_under_load_without_errors(model_dir: Path, tmp_path: Path) -> None:
    """benchmarks/serving/reload_under_load.py: SIGHUP to the service as it ships, under wrk."""
    if not CIFAR.is_file() or shutil.which("wrk") is None:
        pytest.skip(f"needs wrk and {CIFAR}")
    output = tmp_path / "reload"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving" / "reload_under_load.py"), "--model-dir",
                    str(model_dir), "--model", "tiny-lenet", "--clients", "8", "--seconds", "2", "--every", "1",
                    "--warmup", "1", "--output", str(output)], check=True, cwd=ROOT, timeout=300)
    result = json.loads(output.with_suffix(".json").read_text())
    assert result["reloads"]["loaded"] == result["reloads"]["asked"] == 1 and result["reloads"]["failed"] == 0
    for run in ("without_reloads", "with_reloads"):
        assert result[run]["requests"] > 0 and result[run]["errors"] == 0
    assert "| with reloads |" in output.with_suffix(".md").read_text()
