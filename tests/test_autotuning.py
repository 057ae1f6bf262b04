"""Autotuned "auto": a checked, timed, cached choice per op, device, dtype and shape bucket.

On CPU the candidates are "reference", "torch" and (under TRITON_INTERPRET=1) "triton"."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import sharnn_fast
from op_cases import OP_CASES
from sharnn_fast import autotuning, backend, ops
from sharnn_fast.ops.boom.reference import boom_reference
from tolerances import flat_tensors

boom_module = importlib.import_module("sharnn_fast.ops.boom")  # the package; ops.boom is the function


@pytest.fixture(autouse=True)
def fresh_tuner(tmp_path, monkeypatch):
    """Every test starts with tuning off, nothing chosen and an empty cache directory of its own."""
    monkeypatch.setenv(autotuning.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(autotuning.ENV_SWITCH, raising=False)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)

    def reset():
        autotuning._choices.clear()
        autotuning._disk = None
        autotuning._warned_cache = False
        autotuning._enabled = None
    reset()
    yield
    reset()


def boom_line() -> str:
    """explain()'s line for the Boom (other ops' lines may stand from earlier tests)."""
    return next(line for line in sharnn_fast.explain().splitlines() if line.startswith("boom: "))


def boom_inputs(requires_grad=False):
    x = torch.randn(37, 3, 16, requires_grad=requires_grad)
    return x, 0.3 * torch.randn(48, 16), 0.1 * torch.randn(48)


def test_off_by_default_and_switched_on_by_call_or_environment(monkeypatch):
    assert not autotuning.enabled()
    ops.boom(*boom_inputs())
    assert "static preference" in boom_line()
    monkeypatch.setenv(autotuning.ENV_SWITCH, "1")
    assert autotuning.enabled()
    sharnn_fast.autotune(False)
    assert not autotuning.enabled()
    monkeypatch.setenv(autotuning.ENV_SWITCH, "yes")
    sharnn_fast.autotune(None)
    with pytest.raises(ValueError, match="SHARNN_FAST_AUTOTUNE must be 0 or 1"):
        autotuning.enabled()


def test_a_tuned_choice_is_made_explained_and_cached():
    sharnn_fast.autotune(True)
    ops.boom(*boom_inputs())
    report = boom_line()
    assert "autotuned (measured now)" in report
    assert "torch" in report and "reference" in report and " ms" in report
    entries = json.loads(autotuning.cache_path().read_text())["entries"]
    assert len(entries) == 1
    (key, entry), = entries.items()
    assert json.loads(key)["bucket"] == [128, 16, 48, True]  # 111 tokens -> 128; widths exact
    assert entry["backend"] in ("reference", "torch", "triton")
    # Same bucket (another token count up to 128), same choice, nothing measured again.
    ops.boom(torch.randn(100, 16), *boom_inputs()[1:])
    assert len(json.loads(autotuning.cache_path().read_text())["entries"]) == 1
    # A backward, or another width, is another key.
    x, w, b = boom_inputs(requires_grad=True)
    ops.boom(x, w, b).sum().backward()
    assert len(json.loads(autotuning.cache_path().read_text())["entries"]) == 2


def test_a_wrong_backend_is_excluded_and_named(monkeypatch):
    def planted(x, weight, bias, dropout_p=0.0, training=False):
        return 1.01 * boom_reference(x, weight, bias, dropout_p, training)  # 1% off

    monkeypatch.setitem(boom_module.IMPLEMENTATIONS, "planted", backend.Implementation(planted))
    sharnn_fast.autotune(True)
    with pytest.warns(UserWarning, match=r"autotune excluded backend 'planted' for boom: disagrees with torch"):
        y = ops.boom(*boom_inputs())
    report = boom_line()
    assert "excluded planted (disagrees with torch: relative error" in report
    assert not boom_line().startswith("boom: planted")
    entry, = json.loads(autotuning.cache_path().read_text())["entries"].values()
    assert entry["backend"] != "planted" and "planted" not in entry["times_ms"]
    assert torch.isfinite(y).all()


def test_a_backend_that_raises_is_excluded(monkeypatch):
    def broken(*args):
        raise RuntimeError("illegal memory access (simulated)")
    monkeypatch.setitem(boom_module.IMPLEMENTATIONS, "broken", backend.Implementation(broken))
    sharnn_fast.autotune(True)
    with pytest.warns(UserWarning, match="'broken' for boom: raised RuntimeError: illegal memory access"):
        ops.boom(*boom_inputs())


@pytest.mark.parametrize("op", OP_CASES)
def test_tuning_changes_neither_results_nor_random_stream_nor_gradients(op):
    """The first, tuning call gives exactly what the chosen backend gives untuned: the same outputs,
    the same gradients, and the same next random numbers (dropout on, in training)."""
    case = OP_CASES[op]
    dropout = dict(dropout_p=0.3, training=True) if case.has_dropout else {}

    def call(backend_name):
        torch.manual_seed(5)
        leaves = {name: t.requires_grad_(True) for name, t in case.inputs("small").items()}
        outputs = flat_tensors(case.call(leaves, backend=backend_name, **dropout))
        grads = torch.autograd.grad(sum((y * y).sum() for y in outputs), list(leaves.values()))
        return [y.detach() for y in outputs], grads, torch.rand(4)

    sharnn_fast.autotune(True)
    tuned = call(None)
    chosen = sharnn_fast.explain().split(f"{op}: ")[1].split(" ")[0]
    sharnn_fast.autotune(False)
    untuned = call(chosen)
    assert all(torch.equal(a, b) for a, b in zip(tuned[0], untuned[0]))
    assert all(torch.equal(a, b) for a, b in zip(tuned[1], untuned[1]))
    assert torch.equal(tuned[2], untuned[2]), "tuning moved the random number stream"


_IN_A_NEW_PROCESS = """
import torch, sharnn_fast
from sharnn_fast import ops
ops.boom(torch.randn(37, 16), 0.3 * torch.randn(48, 16), torch.zeros(48))
print(sharnn_fast.explain())
"""


def test_the_cache_survives_a_new_process_and_is_rejected_when_versions_change(tmp_path):
    env = dict(os.environ, SHARNN_FAST_AUTOTUNE="1", SHARNN_FAST_CACHE_DIR=str(tmp_path / "shared"))
    env.pop("TRITON_INTERPRET", None)  # the new processes have no interpreter: reference and torch

    def run():
        done = subprocess.run([sys.executable, "-c", _IN_A_NEW_PROCESS], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert "autotuned (measured now)" in run()
    assert "autotuned (from the cache)" in run()
    # Another sharnn_fast version (or torch, Triton, driver, device): the entry does not apply.
    path = tmp_path / "shared" / autotuning.CACHE_FILE
    data = json.loads(path.read_text())
    data["entries"] = {k.replace('"sharnn_fast": "', '"sharnn_fast": "0.0.0-'): v
                       for k, v in data["entries"].items()}
    path.write_text(json.dumps(data))
    assert "autotuned (measured now)" in run()


@pytest.mark.parametrize("content, warning", [
    ("{not json", "ignoring the autotune cache"),
    (json.dumps({"format": "something else"}), "ignoring the autotune cache"),
    (json.dumps({"format": "sharnn_fast.autotune", "version": 1, "entries": {"k": {"no": "backend"}}}),
     r"ignoring 1 entry of the autotune cache .*autotune.json \('k': its key is not a tuning key\)")])
def test_a_corrupt_or_foreign_cache_is_ignored_with_one_warning_and_rewritten(content, warning):
    path = autotuning.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    sharnn_fast.autotune(True)
    with pytest.warns(UserWarning, match=warning):
        ops.boom(*boom_inputs())
    data = json.loads(path.read_text())
    assert data["format"] == "sharnn_fast.autotune" and len(data["entries"]) == 1


def test_clear_autotune_cache():
    sharnn_fast.autotune(True)
    ops.boom(*boom_inputs())
    assert autotuning.cache_path().exists()
    sharnn_fast.clear_autotune_cache()
    assert not autotuning.cache_path().exists()
    ops.boom(*boom_inputs())
    assert "measured now" in boom_line()


def test_nothing_is_tuned_while_compiling():
    sharnn_fast.autotune(True)
    backend.preload("torch")
    w, b = 0.3 * torch.randn(48, 16), torch.zeros(48)
    compiled = torch.compile(lambda x: ops.boom(x, w, b), fullgraph=True, backend="eager")
    compiled(torch.randn(5, 16))
    assert not autotuning.cache_path().exists()
    assert not autotuning._choices


def test_autotune_model_tunes_every_op_up_front_and_leaves_the_model_alone():
    model = sharnn_fast.SHARNN("LSTM", 30, 16, 32, 2, dropout=0.1, dropouth=0.1, dropouti=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 30, (12, 2))
    torch.manual_seed(3)
    expected_next = torch.rand(3)
    torch.manual_seed(3)
    report = sharnn_fast.autotune_model(model, tokens)
    assert torch.equal(torch.rand(3), expected_next)
    for op in ("lstm", "attention", "boom"):
        assert f"{op}: " in report and "autotuned" in report.split(f"{op}: ")[1].split("\n")[0]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert autotuning.enabled(), "the tuned choices are used only while autotuning is on"
    entries = len(json.loads(autotuning.cache_path().read_text())["entries"])
    model(tokens)[0].sum().backward()  # training then reuses the choices: nothing measured again
    assert len(json.loads(autotuning.cache_path().read_text())["entries"]) == entries
    assert "autotuned" in sharnn_fast.explain()


def test_a_tuned_backend_that_refuses_these_exact_sizes_falls_back(monkeypatch):
    """A choice holds for a shape bucket; if the chosen backend cannot run a call inside it, the
    static preference runs instead of an error."""
    sharnn_fast.autotune(True)
    ops.boom(*boom_inputs())
    entry, = json.loads(autotuning.cache_path().read_text())["entries"].values()
    chosen = entry["backend"]
    refusing = backend.Implementation(boom_module.IMPLEMENTATIONS[chosen].run,
                                      why_not=lambda x, *rest: "not this exact size" if x.shape[0] == 100 else None)
    monkeypatch.setitem(boom_module.IMPLEMENTATIONS, chosen, refusing)
    fallback = "reference" if chosen == "torch" else "torch"
    monkeypatch.setattr(backend, "_AUTO_PREFERENCE", {"boom": {"cpu": (fallback,)}})
    ops.boom(torch.randn(100, 16), *boom_inputs()[1:])  # same bucket (128 tokens)
    assert boom_line().startswith(f"boom: {fallback} (auto on cpu, static preference")


# --- issue 21, item 2: a cache shared by processes, entries validated and checked --------------------

_TUNE_AT_ONCE = """
import os, sys, time, torch
from sharnn_fast import autotune, ops
autotune(True)
index, processes, widths = int(sys.argv[1]), int(sys.argv[2]), [int(w) for w in sys.argv[3].split(",")]
folder = os.environ["SHARNN_FAST_CACHE_DIR"]
open(os.path.join(folder, f"ready-{index}"), "w").close()
while sum(name.startswith("ready-") for name in os.listdir(folder)) < processes:  # start together
    time.sleep(0.001)
for width in widths:  # each width is its own entry (widths are exact in the key)
    ops.boom(torch.randn(4, width), 0.3 * torch.randn(2 * width, width), torch.zeros(2 * width), backend=None)
"""


def test_processes_tuning_at_once_lose_none_of_each_others_entries(tmp_path):
    """Four processes each tune six entries of their own at the same moment: all 24 are in the
    file. (Before, each rewrote the file from what it had loaded: most entries were lost.)"""
    folder = tmp_path / "shared"
    folder.mkdir()
    env = dict(os.environ, SHARNN_FAST_CACHE_DIR=str(folder), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    processes, per_process = 4, 6
    widths = [[8 + 2 * (i * per_process + j) for j in range(per_process)] for i in range(processes)]
    running = [subprocess.Popen([sys.executable, "-c", _TUNE_AT_ONCE, str(i), str(processes),
                                 ",".join(map(str, widths[i]))], env=env, stderr=subprocess.PIPE, text=True)
               for i in range(processes)]
    for process in running:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]
    entries = json.loads((folder / autotuning.CACHE_FILE).read_text())["entries"]
    tuned = sorted(json.loads(key)["bucket"][1] for key in entries)
    assert tuned == sorted(w for ws in widths for w in ws), f"{len(entries)} of {processes * per_process} kept"
    assert all(autotuning.entry_problem(key, entry) is None for key, entry in entries.items())


def _edit_the_entry(edit):
    path = autotuning.cache_path()
    data = json.loads(path.read_text())
    (key, entry), = data["entries"].items()
    edit(entry)
    path.write_text(json.dumps(data))
    autotuning._choices.clear()  # as a new process: nothing in memory
    autotuning._disk = None
    return key


def test_an_entry_without_times_is_dropped_with_one_warning_and_measured_again():
    """Before: KeyError 'times_ms' at every call, with no word of the cache."""
    sharnn_fast.autotune(True)
    ops.boom(*boom_inputs())
    _edit_the_entry(lambda entry: entry.pop("times_ms"))
    with pytest.warns(UserWarning) as caught:
        ops.boom(*boom_inputs())
        ops.boom(*boom_inputs())
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(autotuning.cache_path()) in message
    assert "boom float32 bucket [128, 16, 48, true] inference: no times_ms" in message
    assert "autotuned (measured now)" in boom_line()
    entry, = json.loads(autotuning.cache_path().read_text())["entries"].values()
    assert "times_ms" in entry


def test_a_hand_edited_entry_is_checked_again_not_trusted(monkeypatch):
    """An entry edited to choose a backend that gives wrong results is not used: its digest no
    longer matches, so the backends are checked against torch again and the wrong one excluded."""
    def planted(x, weight, bias, dropout_p=0.0, training=False):
        return 1.01 * boom_reference(x, weight, bias, dropout_p, training)  # 1% off

    sharnn_fast.autotune(True)
    ops.boom(*boom_inputs())

    def choose_planted(entry):
        entry["backend"] = "planted"
        entry["times_ms"]["planted"] = 1e-4
        entry.setdefault("errors", {})["planted"] = 0.0
    _edit_the_entry(choose_planted)
    monkeypatch.setitem(boom_module.IMPLEMENTATIONS, "planted", backend.Implementation(planted))
    with pytest.warns(UserWarning) as caught:
        y = ops.boom(*boom_inputs())
    messages = [str(w.message) for w in caught]
    assert any("its digest does not match its fields (edited after it was measured)" in m for m in messages)
    assert any("autotune excluded backend 'planted' for boom: disagrees with torch" in m for m in messages)
    assert not boom_line().startswith("boom: planted")
    x, w, b = boom_inputs()
    torch.testing.assert_close(ops.boom(x, w, b), boom_reference(x, w, b, 0.0, False))
    assert torch.isfinite(y).all()


def test_an_entry_of_an_older_version_without_its_check_is_checked_again():
    sharnn_fast.autotune(True)
    ops.boom(*boom_inputs())
    _edit_the_entry(lambda entry: [entry.pop(k, None) for k in ("checked_against", "errors", "digest")])
    with pytest.warns(UserWarning, match="no record of its check against torch"):
        ops.boom(*boom_inputs())
    assert "autotuned (measured now)" in boom_line()


def test_an_unwritable_cache_is_said_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(autotuning.ENV_CACHE_DIR, str(tmp_path / "a-file" / "cache"))
    (tmp_path / "a-file").write_text("")
    sharnn_fast.autotune(True)
    for width in (16, 24, 32):
        ops.boom(torch.randn(4, width), torch.randn(2 * width, width), torch.zeros(2 * width))
    assert len([r for r in caplog.records if "could not write the autotune cache" in r.getMessage()]) == 1
