"""Every command through Typer's runner and as a real subprocess; bad input gives one line and exit 1."""

import json
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from rnngen import __version__
from rnngen.cli import create_app
from rnngen.model.devices import cuda_unusable_reason

from conftest import invoke, one_line_error  # noqa: E402





def test_version_and_help():
    assert invoke("--version").stdout.strip() == f"rnngen {__version__}"
    result = invoke("--help")
    for command in ("train", "export", "generate", "info", "score"):
        assert command in result.stdout


def test_generate_streams_prompt_and_text(char_model_file):
    result = invoke("generate", "--model", char_model_file, "--prompt", "the ", "-n", "40", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("the ")
    assert len(result.stdout) == len("the ") + 40 + 1  # prompt, 40 chars, newline
    assert "40 tokens in" in result.stderr and "finish: length" in result.stderr
    again = invoke("generate", "--model", char_model_file, "--prompt", "the ", "-n", "40", "--seed", "3", "--quiet")
    assert again.stdout == result.stdout and again.stderr == ""


def test_generate_with_sampling_options_and_stop(char_model_file):
    result = invoke("generate", "-m", char_model_file, "-n", "300", "--seed", "1", "--top-k", "5", "--top-p", "0.9",
                    "--temperature", "1.2", "--stop", "e", "--stop", "zz")
    assert result.exit_code == 0, result.output
    assert "e" not in result.stdout and "finish: stop" in result.stderr


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "-1"], "--temperature: -1.0 is outside [0, 100]"),
    (["--top-p", "0"], "--top-p: 0.0 is outside (0, 1]"),
    (["--temperature", "nan"], "--temperature: nan is not a number in [0, 100]"),
    (["-n", "0"], "--max-new-tokens: 0"),
    (["--device", "tpu"], "--device: 'tpu' is not one of auto, cpu, cuda"),
    (["--prompt", "XYZ"], "not in the model's vocabulary"),
    (["--unknown", "maybe"], "--unknown: 'maybe'"),
])
def test_generate_bad_input(char_model_file, args, needle):
    one_line_error(invoke("generate", "--model", char_model_file, *args), needle)


def test_generate_prompt_from_a_file_or_stdin_and_the_prompt_limit(char_model_file, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the quick brown fox " * 20, encoding="utf-8")
    inline = invoke("generate", "-m", char_model_file, "--prompt", prompt.read_text(), "-n", "30", "--seed", "2", "-q")
    from_file = invoke("generate", "-m", char_model_file, "--prompt-file", prompt, "-n", "30", "--seed", "2", "-q")
    from_stdin = CliRunner().invoke(create_app(), ["generate", "-m", str(char_model_file), "--prompt-file", "-", "-n", "30", "--seed", "2",
                                     "-q"], input=prompt.read_text())
    assert from_file.exit_code == 0 and from_stdin.exit_code == 0, from_file.output + from_stdin.output
    assert from_file.stdout == from_stdin.stdout == inline.stdout[len(prompt.read_text()):]  # the file is not echoed
    one_line_error(invoke("generate", "-m", char_model_file, "--prompt-file", prompt, "--max-prompt-tokens", "100"),
                   "prompt: 400 tokens is more than the limit of 100 tokens (--max-prompt-tokens)")
    one_line_error(invoke("generate", "-m", char_model_file, "--prompt-file", tmp_path / "missing.txt"),
                   "--prompt-file: cannot read")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    one_line_error(invoke("generate", "-m", char_model_file, "--prompt-file", tmp_path / "latin1.txt"),
                   "is not UTF-8 text")
    one_line_error(invoke("generate", "-m", char_model_file, "--prompt-file", prompt, "--prompt", "a"),
                   "give either --prompt or --prompt-file")


def test_generate_refuses_what_is_not_a_model(tmp_path):
    (tmp_path / "x.onnx").write_text("hello")
    one_line_error(invoke("generate", "--model", tmp_path / "x.onnx"), "not an ONNX model")
    one_line_error(invoke("generate", "--model", tmp_path / "none.onnx"), "model file not found")


def test_generate_cuda_where_unusable_is_a_clear_error(char_model_file):
    if cuda_unusable_reason() is None:
        pytest.skip("CUDA is usable here")
    one_line_error(invoke("generate", "--model", char_model_file, "--device", "cuda"), "CUDA cannot be used")


def test_info_table_and_json(char_model_file):
    result = invoke("info", char_model_file)
    assert result.exit_code == 0, result.output
    for needle in ("lstm", "hidden size", "providers used", "CPUExecutionProvider", "char, "):
        assert needle in result.stdout
    data = json.loads(invoke("info", char_model_file, "--json").stdout)
    assert data["cell"] == "lstm" and data["layers"] == 2 and data["format_version"] == 1


def test_score_text_and_json(char_model_file, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be\n" * 20)
    result = invoke("score", char_model_file, text)
    assert result.exit_code == 0, result.output
    assert "nats/char" in result.stdout and "perplexity" in result.stdout
    data = json.loads(invoke("score", char_model_file, text, "--json").stdout)
    assert data["tokens"] == 380 and data["bits_per_char"] > 0
    one_line_error(invoke("score", char_model_file, tmp_path / "none.txt"), "data file not found")




def test_train_then_export_then_generate(corpus_file, tmp_path):
    pytest.importorskip("torch")
    run = tmp_path / "run"
    common = ["--hidden", "16", "--layers", "1", "--steps", "6", "--eval-every", "3", "--seq-len", "16",
              "--batch-size", "4", "--threads", "1", "--sample-tokens", "10"]
    result = invoke("train", corpus_file, "--out", run, *common)
    assert result.exit_code == 0, result.output
    assert "validation loss" in result.stdout and (run / "best.json").exists() and (run / "loss.png").exists()
    again = invoke("train", corpus_file, "--out", run, *common)
    one_line_error(again, "already exists and is not empty")
    assert invoke("train", corpus_file, "--out", run, "--force", *common).exit_code == 0

    out = tmp_path / "m.onnx"
    result = invoke("export", run, "-o", out)
    assert result.exit_code == 0, result.output
    assert "onnx.checker: passed" in result.stdout and "max |diff| logits" in result.stdout
    one_line_error(invoke("export", run, "-o", out), "already exists; use --force")
    assert invoke("export", run, "-o", out, "--force").exit_code == 0
    gen = invoke("generate", "-m", out, "-n", "20", "--seed", "0", "-q")
    assert gen.exit_code == 0 and len(gen.stdout) == 21


def test_train_resume_continues(corpus_file, tmp_path):
    pytest.importorskip("torch")
    run = tmp_path / "run"
    common = ["--hidden", "16", "--layers", "1", "--eval-every", "3", "--seq-len", "16", "--batch-size", "4",
              "--threads", "1", "--sample-tokens", "0"]
    assert invoke("train", corpus_file, "--out", run, "--steps", "3", *common).exit_code == 0
    result = invoke("train", corpus_file, "--resume", run, "--steps", "6")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.stdout and json.loads((run / "last.json").read_text())["step"] == 6
    other = tmp_path / "other.txt"
    other.write_text(corpus_file.read_text() + "more text\n")
    one_line_error(invoke("train", other, "--resume", run, "--steps", "9"), "resume with the same file")
    one_line_error(invoke("train", corpus_file, "--resume", tmp_path / "nothing"), "no last.json")


@pytest.mark.parametrize("setup,args,needle", [
    (None, [], "data file not found"),
    (b"", [], "data file is empty"),
    (b"\x00\x01\x02binary", [], "looks binary"),
    (b"short text\n", [], "corpus too short"),
    (b"x" * 5000, ["--hidden", "0"], "--hidden: 0"),
    (b"x" * 5000, ["--seq-len", "-4"], "--seq-len: -4"),
    (b"x" * 5000, ["--cell", "transformer"], "--cell: 'transformer'"),
    (b"x" * 5000, ["--steps", "5", "--epochs", "1"], "either --steps or --epochs"),
])
def test_train_bad_input(tmp_path, setup, args, needle):
    pytest.importorskip("torch")
    data = tmp_path / "data.txt"
    if setup is not None:
        data.write_bytes(setup)
    one_line_error(invoke("train", data, "--out", tmp_path / "run", *args), needle)


def test_export_bad_checkpoint(tmp_path):
    pytest.importorskip("torch")
    one_line_error(invoke("export", tmp_path, "-o", tmp_path / "m.onnx"), "no checkpoint")
    (tmp_path / "x.json").write_text("{}")
    one_line_error(invoke("export", tmp_path / "x.json", "-o", tmp_path / "m.onnx"), "not an rnngen checkpoint")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "rnngen", *map(str, args)], capture_output=True, text=True, timeout=120, env=env)


def test_commands_as_subprocesses(char_model_file, tmp_path):
    assert run_cli("--version").stdout.strip() == f"rnngen {__version__}"
    gen = run_cli("generate", "-m", char_model_file, "-p", "to", "-n", "25", "--seed", "4")
    assert gen.returncode == 0 and gen.stdout.startswith("to") and len(gen.stdout) == 28
    info = run_cli("info", char_model_file, "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["cell"] == "lstm"
    (tmp_path / "t.txt").write_text("to be\n" * 10)
    score = run_cli("score", char_model_file, tmp_path / "t.txt", "--json")
    assert score.returncode == 0 and json.loads(score.stdout)["tokens"] == 60
    bad = run_cli("generate", "-m", tmp_path / "t.txt")
    assert bad.returncode == 1 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError("No module named 'torch'", name="torch")
    sys.meta_path.insert(0, NoTorch())
    sys.argv = ["rnngen"] + sys.argv[1:]
    from rnngen.cli import main
    try:
        main()
    finally:
        assert "torch" not in sys.modules
""")


def test_generate_info_score_work_without_torch(char_model_file, tmp_path):
    """As in an environment where torch is not installed: any import of torch fails."""
    script = tmp_path / "notorch.py"
    script.write_text(BLOCK_TORCH)
    (tmp_path / "t.txt").write_text("to be\n" * 10)
    for args in (["generate", "-m", char_model_file, "-n", "30", "--seed", "2"],
                 ["info", char_model_file], ["score", char_model_file, tmp_path / "t.txt"]):
        proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, str(script), "train", str(tmp_path / "t.txt")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "torch" in proc.stderr


def test_train_and_export_as_subprocesses(corpus_file, tmp_path):
    pytest.importorskip("torch")
    run = tmp_path / "run"
    train = run_cli("train", corpus_file, "--out", run, "--hidden", "16", "--layers", "1", "--steps", "4",
                    "--eval-every", "2", "--seq-len", "16", "--batch-size", "4", "--threads", "1", "--cell", "gru")
    assert train.returncode == 0, train.stderr
    assert "step 4: validation loss" in train.stdout and "done: 4 steps" in train.stdout
    export = run_cli("export", run, "-o", tmp_path / "m.onnx")
    assert export.returncode == 0, export.stderr
    assert "parity onnxruntime vs PyTorch" in export.stdout
    again = run_cli("export", run, "-o", tmp_path / "m.onnx")
    assert again.returncode == 1 and "--force" in again.stderr


def test_generate_json_samples_and_beams(char_model_file):
    result = invoke("generate", "-m", char_model_file, "-p", "the ", "-n", "30", "--samples", "3", "--seed", "9",
                    "--min-p", "0.05", "--repetition-penalty", "1.3", "--presence-penalty", "0.2",
                    "--frequency-penalty", "0.1", "--no-repeat-ngram", "4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["seed"] == 9 and data["prompt_tokens"] == 4
    assert [s["index"] for s in data["sequences"]] == [0, 1, 2]
    for s in data["sequences"]:
        assert set(s) == {"index", "text", "tokens", "finish_reason", "logprob"}
        assert s["tokens"] == 30 and len(s["text"]) == 30 and s["finish_reason"] == "length" and s["logprob"] < 0
    beams = json.loads(invoke("generate", "-m", char_model_file, "-p", "the ", "-n", "20", "--beams", "4",
                              "--num-return", "2", "--length-penalty", "0.5", "--early-stopping", "--json").stdout)
    assert len(beams["sequences"]) == 2
    assert beams["sequences"][0]["beam_score"] >= beams["sequences"][1]["beam_score"]


def test_generate_several_sequences_printed_with_headers(char_model_file):
    result = invoke("generate", "-m", char_model_file, "-p", "to", "-n", "15", "--samples", "2", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert "sequence 1" in result.stdout and "sequence 2" in result.stdout
    assert "30 tokens in" in result.stderr


@pytest.mark.parametrize("args,needle", [
    (["--beams", "0"], "--beams: 0 is outside [1, 64]"),
    (["--num-return", "3"], "--num-return: 3 is more than --beams (1)"),
    (["--samples", "2", "--beams", "2"], "cannot be combined with beam search"),
    (["--min-p", "1.5"], "--min-p: 1.5 is outside [0, 1]"),
    (["--repetition-penalty", "0"], "--repetition-penalty: 0.0 is outside (0, 10]"),
    (["--presence-penalty", "nan"], "--presence-penalty: nan"),
    (["--top-k", "1000"], "--top-k: 1000 is larger than the model's vocabulary"),
])
def test_generate_bad_engine_options(char_model_file, args, needle):
    one_line_error(invoke("generate", "--model", char_model_file, *args), needle)
