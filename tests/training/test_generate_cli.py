"""``sharnn generate``: a checkpoint from ``sharnn train`` continues a prompt, streaming UTF-8."""
import io

import pytest
import torch

import sharnn_fast
from sharnn_fast.cli_generate import generate_text
from test_cli import run_main
from training_helpers import SMALL, assert_one_line_error, run_sharnn


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus_file):
    run = tmp_path_factory.mktemp("run")
    trained = run_sharnn("train", *SMALL, "--data", corpus_file, "--max-steps", "2", "--save", run)
    assert trained.returncode == 0, trained.stderr
    return run / "last.pt"


def test_generate_streams_text_and_a_seed_reproduces_it(checkpoint):
    args = ["generate", "--checkpoint", checkpoint, "--prompt", "The module ", "--max-new-tokens", "40",
            "--top-k", "20", "--top-p", "0.9", "--temperature", "0.8", "--seed", "3"]
    first, second = run_sharnn(*args), run_sharnn(*args)
    assert first.returncode == 0, first.stderr
    assert first.stderr == "" and first.stdout == second.stdout
    assert len(first.stdout.rstrip("\n")) > 0


def test_greedy_output_is_the_models_greedy_continuation(checkpoint):
    result = run_sharnn("generate", "--checkpoint", checkpoint, "--prompt", "def ", "--max-new-tokens", "25",
                        "--greedy")
    assert result.returncode == 0, result.stderr
    model, _ = sharnn_fast.load_checkpoint(checkpoint)
    prompt = torch.tensor(list(b"def ")).unsqueeze(1)
    expected = bytes(model.generate(prompt, 25, do_sample=False)[4:, 0].tolist())
    assert result.stdout == expected.decode("utf-8", errors="replace") + "\n"


def test_a_tiny_temperature_gives_the_greedy_text(checkpoint, capsys):
    common = ["generate", "--checkpoint", checkpoint, "--prompt", "def ", "--max-new-tokens", "25"]
    greedy = run_main(capsys, *common, "--greedy")
    for temperature in ("1e-38", "1e-300"):
        tiny = run_main(capsys, *common, "--temperature", temperature, "--seed", "1")
        assert tiny.returncode == 0, tiny.stderr
        assert tiny.stdout == greedy.stdout


def test_bytes_are_written_as_they_come(checkpoint):
    class Recorder(io.StringIO):
        flushes = 0

        def flush(self):
            Recorder.flushes += 1

    out = Recorder()
    new = generate_text(checkpoint, "é".encode() + b"x", out, max_new_tokens=12, seed=0)
    assert len(new) == 12 and Recorder.flushes >= 12
    assert out.getvalue() == new.decode("utf-8", errors="replace")


def test_bad_input_gets_one_line_and_no_traceback(tmp_path, checkpoint, capsys):
    assert_one_line_error(run_sharnn("generate", "--checkpoint", tmp_path / "missing.pt", "--prompt", "a"),
                          "does not exist")
    cases = [
        (["--prompt", ""], ["prompt is empty"]),
        (["--prompt", "a", "--temperature", "0"], ["argument --temperature", "use --greedy"]),
        (["--prompt", "a", "--top-p", "1.5"], ["argument --top-p", "expected a number in (0, 1]"]),
        (["--prompt", "a", "--greedy", "--top-k", "5", "--seed", "1"], ["--greedy", "--top-k, --seed would have no effect"]),
        (["--prompt-file", tmp_path / "none.txt"], ["--prompt-file: cannot read"]),
        (["--prompt", "a", "--max-new-tokens", "-1"], ["argument --max-new-tokens", "expected an integer >= 0"]),
        (["--prompt", "a", "--prompt-file", "x"], ["not allowed with argument"]),
        (["--prompt", "a", "--top-k", "0"], ["argument --top-k"]),
    ]
    for extra, fragments in cases:
        assert_one_line_error(run_main(capsys, "generate", "--checkpoint", checkpoint, *extra), *fragments)


def test_files_that_are_not_checkpoints_get_one_line(tmp_path, checkpoint, capsys):
    (tmp_path / "text.pt").write_text("hello\n")
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 4)
    for command in (["eval"], ["generate", "--prompt", "a"]):
        for bad, fragments in ((tmp_path / "text.pt", ["is not a sharnn_fast checkpoint"]),
                               (tmp_path / "noise.pt", ["is not a sharnn_fast checkpoint"]),
                               (checkpoint.parent, ["is a folder", "best.pt"])):
            result = run_main(capsys, command[0], "--checkpoint", bad, *command[1:])
            assert_one_line_error(result, *fragments)
            assert "weights_only set to False" not in result.stderr  # no advice to load unsafely
    with pytest.raises(ValueError, match="is not a sharnn_fast checkpoint"):
        sharnn_fast.load_checkpoint(tmp_path / "text.pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_generate_on_a_missing_gpu_gets_one_line(checkpoint, capsys):
    assert_one_line_error(run_main(capsys, "generate", "--checkpoint", checkpoint, "--prompt", "a",
                                   "--device", "cuda"), "sees no CUDA GPU")


def test_plot_to_a_bad_path_gets_one_line(checkpoint, capsys):
    pytest.importorskip("matplotlib")
    run = checkpoint.parent
    assert_one_line_error(run_main(capsys, "plot", run, "--out", run / "missing" / "x.png"), "--out", "cannot write")
    assert_one_line_error(run_main(capsys, "plot", run, "--out", run / "x.unknownformat"), "--out", "cannot write")


def test_a_prompt_that_is_not_utf8_is_taken_as_the_bytes_given(checkpoint):
    """Issue 21, item 7: a --prompt holding bytes that are not UTF-8 (a lone 0xff) was an internal
    error. On POSIX the command line is bytes: the prompt is those bytes, as --prompt-file reads them."""
    import os
    import subprocess
    import sys

    from training_helpers import ROOT, sharnn_env

    if os.name != "posix":
        pytest.skip("the command line is bytes only on POSIX")
    result = subprocess.run([sys.executable.encode(), b"-m", b"sharnn_fast", b"generate", b"--checkpoint",
                             bytes(checkpoint), b"--prompt", b"def \xff", b"--max-new-tokens", b"12", b"--greedy"],
                            capture_output=True, timeout=120, env=sharnn_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    model, _ = sharnn_fast.load_checkpoint(checkpoint)
    prompt = torch.tensor(list(b"def \xff")).unsqueeze(1)
    expected = bytes(model.generate(prompt, 12, do_sample=False)[5:, 0].tolist())
    assert result.stdout == (expected.decode("utf-8", errors="replace") + "\n").encode()


def test_a_reader_that_stops_reading_ends_generate_quietly(checkpoint):
    """`sharnn generate ... | head -c 20`: once head exits, writing stdout fails with a broken pipe.
    Before, that was "internal error: BrokenPipeError ... please report it"; now the command stops
    quietly with 141 (128 + SIGPIPE, what a shell reports for a writer its reader left)."""
    import subprocess
    import sys

    from training_helpers import ROOT, sharnn_env

    process = subprocess.Popen([sys.executable, "-m", "sharnn_fast", "generate", "--checkpoint", str(checkpoint),
                                "--prompt", "The ", "--max-new-tokens", "100000", "--compile", "off"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=sharnn_env(), cwd=ROOT)
    try:
        assert len(process.stdout.read(20)) == 20
        process.stdout.close()  # as head does when it has its 20 bytes
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=120) == 141, stderr
    finally:
        process.kill()
    assert stderr == ""


def test_compile_on_reports_its_compile_on_stderr_and_off_never_compiles(checkpoint, capsys, monkeypatch):
    """--compile on|off reaches generate; the compile's one line (logged by sharnn_fast.generation)
    goes to stderr. The compile itself is stubbed out here: tests/test_generation.py compiles."""
    from sharnn_fast import generation

    calls = []

    def stub(model, decoder, batch, required):
        calls.append(required)
        generation.logger.info("compiled the decode step in %.1f s (once per model and batch size)", 1.5)
        return None  # as after a failed compile: the eager step decodes

    monkeypatch.setattr(generation, "_compile_step", stub)
    common = ["generate", "--checkpoint", checkpoint, "--prompt", "def ", "--max-new-tokens", "25", "--greedy"]
    off = run_main(capsys, *common, "--compile", "off")
    on = run_main(capsys, *common, "--compile", "on")
    assert off.returncode == on.returncode == 0, (off.stderr, on.stderr)
    assert calls == [True] and off.stderr == ""
    assert on.stderr == "compiled the decode step in 1.5 s (once per model and batch size)\n"
    assert on.stdout == off.stdout


def test_compile_on_that_cannot_compile_gets_one_line(checkpoint, capsys, monkeypatch):
    from sharnn_fast import generation

    def no_compiler():
        def step(model, decoder, token):
            raise RuntimeError("no C++ compiler found")
        return step

    monkeypatch.setattr(generation, "_new_compiled_step", no_compiler)
    result = run_main(capsys, "generate", "--checkpoint", checkpoint, "--prompt", "a", "--compile", "on")
    assert_one_line_error(result, "no C++ compiler found", "--compile off")
