"""The train-step benchmark runs its variants (in-process here, to stay fast) and reports sane numbers."""

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def train_step():
    spec = importlib.util.spec_from_file_location("train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", ["online_chunked", "cached", "gkd"])
def test_each_variant_reports_time_memory_and_tokens(train_step, variant):
    args = train_step.parse_args(["--quick", "--vocab", "2048", "--steps", "1", "--run-variant", variant])
    result = train_step.run_variant(args)
    assert result["variant"] == variant
    assert result["step_time_s"] > 0 and math.isfinite(result["peak_memory_mb"])
    assert result["trained_tokens_per_step"] > 0
    assert 0 < result["data_time_s"] and 0 < result["data_fraction"] < 1
    if variant == "cached":
        assert 0 < result["cache_bytes_per_trained_token"] <= 400  # k=64: int32 ids, float16 log-probs, a float32 tail


def test_startup_is_timed_on_released_shape_rows_and_the_second_run_encodes_nothing(train_step, tmp_path):
    train_step.write_released_rows(tmp_path, 6)
    args = train_step.parse_args(["--quick", "--run-startup", str(tmp_path)])
    first, second = train_step.run_startup(args), train_step.run_startup(args)
    assert first["rows"] == second["rows"] == 6 and first["rows_encoded"] == 6 and second["rows_encoded"] == 0
    assert first["startup_s"] > 0 and first["data_time_per_batch_s"] > 0
