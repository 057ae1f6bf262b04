"""Autotuning ("auto" measuring the backends on this machine, sharnn_fast.autotuning):

- its first-call cost: a model training step whose every op is tuned from scratch (checked and
  timed on every backend that can run it) against the same step with the static preference;
- the model training step with the tuned choices, against "auto" without tuning and against every
  backend forced.

At the model size of bench_model.py (conftest.MODEL_SIZES): the paper's on a GPU, small on a CPU.
The tuning cache is written to a temporary folder, never the user's.
"""
import pytest

import sharnn_fast
from bench_model import Case, Spec, train_step
from sharnn_fast import autotuning

FORCED = ["reference", "torch", "triton", "cuda"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(autotuning.ENV_CACHE_DIR, str(tmp_path))
    sharnn_fast.clear_autotune_cache()
    yield
    sharnn_fast.clear_autotune_cache()
    sharnn_fast.autotune(None)


def with_tuning(step, forget_first):
    """``step`` run with autotuning on; with ``forget_first``, every call tunes from scratch."""
    def run():
        if forget_first:
            sharnn_fast.clear_autotune_cache()
        sharnn_fast.autotune(True)
        try:
            step()
        finally:
            sharnn_fast.autotune(None)
    return run


def test_autotune_first_call(bench, device, model_size):
    static = Case(Spec("auto", "auto"), "single", model_size, device, "train")
    tuned = Case(Spec("auto", "auto"), "single", model_size, device, "train")
    tokens = model_size["T"] * model_size["B"]
    bench.compare("autotune: first training step, every op tuned",
                  {"static preference": train_step(static),
                   "autotune from scratch": with_tuning(train_step(tuned), forget_first=True)},
                  baseline="static preference", size=dict(model_size, attention="single"),
                  work=dict(tokens=tokens), budget="model")


def test_autotuned_train_step(bench, device, model_size):
    runs, skipped = {}, {}
    for variant in FORCED + ["auto"]:
        case = Case(Spec(variant, variant), "single", model_size, device, "train")
        reason = case.prepare()
        if reason is not None:
            skipped[variant] = reason
            continue
        runs[variant] = train_step(case)
    tuned_case = Case(Spec("auto", "auto"), "single", model_size, device, "train")
    tuned = with_tuning(train_step(tuned_case), forget_first=False)
    tuned()  # tune once, outside the timed rounds
    runs["auto + autotune"] = tuned
    bench.compare("autotune: model train step, tuned choices", runs, baseline="auto",
                  size=dict(model_size, attention="single"),
                  work=dict(tokens=model_size["T"] * model_size["B"]), skipped=skipped, budget="model")
