"""`sharnn train --autotune on|off`: "auto" tuned at the first step, reported in one line and in
metrics.jsonl; on by default where a GPU trains, off on a CPU."""
import json

import pytest
import torch

from training_helpers import SMALL, assert_one_line_error, run_sharnn, sharnn_env


def _events(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_autotune_on_reports_what_it_measured_and_chose(tmp_path, corpus_file):
    run = tmp_path / "run"
    env = sharnn_env(SHARNN_FAST_CACHE_DIR=str(tmp_path / "cache"))
    result = run_sharnn("train", "--preset", "tiny", *SMALL, "--data", corpus_file, "--max-steps", "3",
                        "--autotune", "on", "--save", run, env=env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("autotune:")]
    assert len(lines) == 1, result.stdout + result.stderr
    assert "at the first step (T " in lines[0] and "B 4, fp32, training" in lines[0]
    tuned = [e for e in _events(run) if e["split"] == "autotune"]
    assert len(tuned) == 1 and tuned[0]["step"] == 1 and tuned[0]["seconds"] > 0
    assert tuned[0]["segment_length"] > 0 and tuned[0]["precision"] == "fp32"
    assert set(tuned[0]["choices"]) == {"lstm", "attention", "boom"}
    for op, why in tuned[0]["choices"].items():
        assert "autotuned (measured now)" in why and "reference" in why, (op, why)
    assert (tmp_path / "cache" / "autotune.json").exists()


def test_a_cache_entry_without_times_is_dropped_with_a_warning_naming_the_cache(tmp_path, corpus_file):
    """Issue 21, item 2: before, such an entry made every run fail with "internal error: KeyError:
    'times_ms'", without a word of the cache."""
    env = sharnn_env(SHARNN_FAST_CACHE_DIR=str(tmp_path / "cache"))
    args = ["train", "--preset", "tiny", *SMALL, "--data", corpus_file, "--max-steps", "1", "--autotune", "on"]
    assert run_sharnn(*args, "--save", tmp_path / "run1", env=env).returncode == 0
    cache = tmp_path / "cache" / "autotune.json"
    data = json.loads(cache.read_text())
    for entry in data["entries"].values():
        del entry["times_ms"]
    cache.write_text(json.dumps(data))
    result = run_sharnn(*args, "--save", tmp_path / "run2", env=env)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "UserWarning" in line]
    assert len(warned) == 1 and f"of the autotune cache {cache}" in warned[0] and "no times_ms" in warned[0]
    assert "autotuned (measured now)" in result.stdout + result.stderr
    assert all("times_ms" in entry for entry in json.loads(cache.read_text())["entries"].values())


def test_autotune_is_off_by_default_on_a_cpu(tmp_path, corpus_file):
    run = tmp_path / "run"
    env = sharnn_env(SHARNN_FAST_CACHE_DIR=str(tmp_path / "cache"))
    result = run_sharnn("train", "--preset", "tiny", *SMALL, "--data", corpus_file, "--max-steps", "2",
                        "--save", run, env=env)
    assert result.returncode == 0, result.stderr
    assert "autotune:" not in result.stdout + result.stderr
    assert not [e for e in _events(run) if e["split"] == "autotune"]
    assert not (tmp_path / "cache" / "autotune.json").exists()


def test_autotune_with_an_explicit_backend_says_nothing_was_tuned(tmp_path, corpus_file):
    run = tmp_path / "run"
    env = sharnn_env(SHARNN_FAST_CACHE_DIR=str(tmp_path / "cache"))
    result = run_sharnn("train", "--preset", "tiny", *SMALL, "--data", corpus_file, "--max-steps", "1",
                        "--autotune", "on", "--backend", "torch", "--save", run, env=env)
    assert result.returncode == 0, result.stderr
    assert "autotune: nothing tuned, --backend torch was asked for" in result.stdout + result.stderr


def test_autotune_flag_is_checked():
    assert_one_line_error(run_sharnn("train", "--autotune", "yes"), "--autotune", "expected on or off")


@pytest.mark.gpu
def test_autotune_is_on_by_default_on_a_gpu(tmp_path, corpus_file):
    run = tmp_path / "run"
    env = sharnn_env(SHARNN_FAST_CACHE_DIR=str(tmp_path / "cache"))
    result = run_sharnn("train", "--preset", "tiny", *SMALL, "--data", corpus_file, "--max-steps", "2",
                        "--device", "cuda", "--save", run, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    tuned = [e for e in _events(run) if e["split"] == "autotune"]
    assert len(tuned) == 1 and tuned[0]["precision"] == "fp16" and tuned[0]["choices"]  # the GPU default
    assert torch.cuda.is_available()
