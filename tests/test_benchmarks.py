"""The loss benchmark runs end to end on a tiny setting and its three implementations agree (no speed asserts)."""

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loss_memory.py"


def test_loss_memory_reports_agreeing_implementations():
    command = [sys.executable, str(SCRIPT), "--vocab", "512", "--tokens", "64", "--hidden", "32", "--repeats", "1",
               "--head", "trainable"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["machine"]["cpu_count"] >= 1
    (case,) = report["cases"]
    results = {result["implementation"]: result for result in case["results"]}
    assert {"ours", "gkd"} <= results.keys()
    for result in results.values():
        assert result["status"] == "ok"
        assert result["peak_memory_mb"] > 0 and result["time_ms"] > 0 and math.isfinite(result["loss"])
        assert result["max_abs_diff_vs_ours"] < 1e-4


def test_generation_benchmark_runs_every_episode_at_each_batch_size():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "generation.py"
    command = [sys.executable, str(script), "--episodes", "4", "--batch-sizes", "1", "4", "--steps", "2",
               "--new-tokens", "6", "--hidden", "32", "--layers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert [r["batch_size"] for r in report["results"]] == [1, 4]
    for result in report["results"]:
        assert result["episodes"] == 4 and result["steps"] == 8  # random weights never answer: max steps each
        assert result["episodes_per_second"] > 0
    assert report["results"][0]["speedup_vs_first"] == 1.0


def test_self_consistency_benchmark_compares_with_greedy(tiny_model_dir):
    model_dir = tiny_model_dir("agent")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "self_consistency.py"
    command = [sys.executable, str(script), "--model", str(model_dir), "--episodes", "2", "--n", "3",
               "--max-steps", "1", "--new-tokens", "4", "--repeats", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    greedy, voted = json.loads(done.stdout)["results"]
    assert greedy["setting"] == "greedy" and voted["setting"] == "self_consistency_3"
    assert greedy["episodes"] == voted["episodes"] == 2 and greedy["time_per_episode_vs_greedy"] == 1.0
    assert voted["valid_candidates_per_step"] is not None and voted["seconds_per_episode"] > 0
