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
