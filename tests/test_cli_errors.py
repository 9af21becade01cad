"""The CLI as a new user meets it: one error boundary, messages in the CLI's words, help as Typer/Click shows it."""

import json
import os
import stat

import pytest
import typer.main

from rnngen.cli import create_app
from rnngen.cli.console import cli_names, long_options
from rnngen.decoding.params import GenerationParams
from rnngen.errors import InvalidParameterError

from conftest import invoke, one_line_error  # noqa: E402

app = create_app()
group = typer.main.get_command(app)



# Options typed as text that take a path among other things (a model's name, a model source).
TEXT_PATHS = {("generate", "model"), ("inspect", "model"), ("serve", "session_secret_file")}


def path_parameters():
    """(command, parameter) for every parameter of every command that takes a file or directory path."""
    return [(name, p) for name, command in sorted(group.commands.items()) for p in command.params
            if "Path" in type(p.type).__name__ or (name, p.name) in TEXT_PATHS]


def test_every_path_parameter_of_every_command_is_walked():
    walked = {(name, p.name) for name, p in path_parameters()}
    # train --out and --resume, serve --model / --tls-*, export's two paths...: all of them, by name.
    assert walked == set(MISSING_PATH_CASES), walked ^ set(MISSING_PATH_CASES)


# (command, parameter) -> the arguments that give that parameter a missing path (the rest valid), and what the
# one line must say. Paths under MISSING do not exist; "{model}" and "{text}" are a real model and text file.
MISSING_PATH_CASES = {
    ("export", "checkpoint"): (["export", "{missing}", "-o", "{tmp}/m.onnx"], "checkpoint not found"),
    ("export", "output"): (["export", "{missing}", "-o", "{missing}/m.onnx"], "does not exist"),
    ("generate", "tls_ca"): (["generate", "--server", "127.0.0.1:9", "--tls-ca", "{missing}"], "No such file"),
    ("generate", "session_out"): (["generate", "--server", "127.0.0.1:9", "--session-out", "{missing}/s.tok"],
                                  "does not exist"),
    ("generate", "resume"): (["generate", "--server", "127.0.0.1:9", "--resume", "{missing}"], "No such file"),
    ("health", "tls_ca"): (["health", "--tls-ca", "{missing}"], "No such file"),
    ("generate", "model"): (["generate", "-m", "{missing}"], "not found"),
    ("inspect", "model"): (["inspect", "-m", "{missing}", "{text}"], "not found"),
    ("serve", "session_secret_file"): (["serve", "--port", "0", "-m", "{model}", "--session-secret-file", "{missing}"],
                                       "No such file"),
    ("info", "model"): (["info", "{missing}"], "not found"),
    ("inspect", "text_file"): (["inspect", "-m", "{model}", "{missing}"], "no such file"),
    ("inspect", "output"): (["inspect", "-m", "{model}", "{text}", "-o", "{missing}/r.html"], "No such file"),
    ("score", "model"): (["score", "{missing}", "{text}"], "not found"),
    ("score", "file"): (["score", "{model}", "{missing}"], "not found"),
    ("serve", "model"): (["serve", "--port", "0", "-m", "{missing}"], "not found"),
    ("serve", "tls_cert"): (["serve", "--port", "0", "-m", "{model}", "--tls-cert", "{missing}", "--tls-key", "{text}"],
                            "No such file"),
    ("serve", "tls_key"): (["serve", "--port", "0", "-m", "{model}", "--tls-key", "{missing}", "--tls-cert", "{text}"],
                           "No such file"),
    ("train", "data"): (["train", "{missing}"], "not found"),
    ("train", "resume"): (["train", "{text}", "--resume", "{missing}"], "no last.json"),
    ("train", "val_file"): (["train", "{text}", "--val-file", "{missing}"], "not found"),
    ("train", "out"): (["train", "{text}", "--out", "{text}/run", "--hidden", "8", "--batch-size", "2", "--seq-len", "8"],
                       "Not a directory"),  # a missing --out is created: here its parent is a file
}


@pytest.mark.parametrize("case", sorted(MISSING_PATH_CASES))
def test_missing_paths_are_one_line_errors(case, char_model_file, tmp_path):
    if case[0] in ("train", "export"):
        pytest.importorskip("torch")
    args, needle = MISSING_PATH_CASES[case]
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be\n" * 200)
    values = {"missing": tmp_path / "missing", "model": char_model_file, "text": text, "tmp": tmp_path}
    result = invoke(*[a.format(**values) for a in args], env={"RNNGEN_SESSION_SECRET": "s" * 32})
    one_line_error(result, needle)
    assert not (tmp_path / "missing").exists()  # nothing created on the way


def test_parameter_errors_name_cli_options(char_model_file):
    for args, message in [
        (["--samples", "0"], "--samples: 0 is outside [1, 256]"),
        (["--samples", "2", "--beams", "3"], "--samples: several samples cannot be combined with beam search (--beams); "
                                             "use --num-return for several beams"),
        (["--num-return", "3"], "--num-return: 3 is more than --beams (1); for several samples use --samples"),
        (["-n", "0"], "--max-new-tokens: 0 is outside [1, 100000000]"),
        (["--beams", "0"], "--beams: 0 is outside [1, 64]"),
        (["--unknown", "maybe"], "--unknown: 'maybe' is not one of error, replace, skip"),
        (["--top-p", "0"], "--top-p: 0.0 is outside (0, 1]"),
        (["--top-p", "1.5"], "--top-p: 1.5 is outside (0, 1]"),
        (["--top-p", "nan"], "--top-p: nan is not a number in (0, 1]"),
        (["--no-repeat-ngram", "99"], "--no-repeat-ngram: 99 is outside [0, 64]"),
        (["--device", "tpu"], "--device: 'tpu' is not one of auto, cpu, cuda"),
        (["--unit", "l0.h[0]"], "--unit: unit activations are reported with --introspect on"),
    ]:
        one_line_error(invoke("generate", "-m", char_model_file, *args), message)


def test_one_message_three_vocabularies():
    with pytest.raises(InvalidParameterError) as refused:
        GenerationParams(n=2, num_beams=3)
    error = refused.value
    assert str(error) == ("n: several samples cannot be combined with beam search (num_beams); "
                          "use num_return_sequences for several beams")  # the Python API's words
    assert error.parameters == ("n", "num_beams", "num_return_sequences")
    assert error.in_terms_of(cli_names(error.parameters, long_options(group))).startswith("--samples: ")
    from rnngen.serving.protocol import error_details

    with pytest.raises(InvalidParameterError) as refused:
        GenerationParams(top_p=1.5)
    assert error_details(refused.value) == "params.top_p: 1.5 is outside (0, 1]"  # the proto field's path


def test_every_generation_parameter_has_its_cli_option():
    options = long_options(group)
    generate_options = {o for p in group.commands["generate"].params for o in p.opts}
    names = cli_names([f for f in GenerationParams.__dataclass_fields__], options)
    assert all(option in generate_options for option in names.values()), names


def test_error_after_streamed_text_starts_on_its_own_line(char_model_file):
    # `only` keeps a, `ban` takes it away: the first step has no token left, after the prompt was written.
    result = invoke("generate", "-m", char_model_file, "-p", "the ", "--processor", "only:a", "--processor", "ban:a")
    one_line_error(result, "no token is left to choose")
    assert result.stdout == "the \n"


def test_ctrl_c_exits_130_on_a_line_of_its_own(char_model_file, monkeypatch):
    from rnngen.decoding.generation import Generation

    def interrupted(self):
        yield from []
        raise KeyboardInterrupt

    monkeypatch.setattr(Generation, "__iter__", interrupted)
    result = invoke("generate", "-m", char_model_file, "-p", "as th")
    assert result.exit_code == 130 and result.stdout == "as th\n" and result.stderr.strip() == "interrupted"


def test_train_and_export_without_the_train_extra_say_how_to_install_it(tmp_path):
    import subprocess
    import sys

    from test_cli import BLOCK_TORCH

    script = tmp_path / "notorch.py"
    script.write_text(BLOCK_TORCH)
    (tmp_path / "t.txt").write_text("to be\n" * 10)
    for args in (["train", tmp_path / "t.txt"], ["export", tmp_path, "-o", tmp_path / "m.onnx"]):
        proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                              timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("error: training and export need the train extra")
        assert "pip install 'rnngen[train]'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_help_renders_as_typer_and_click_cli_help():
    wide = {"COLUMNS": "200"}
    train_help = invoke("train", "--help", env=wide).stdout
    assert "Usage: rnngen train [OPTIONS] DATA" in train_help
    assert "[default: (runs/CELL)]" in train_help  # a default in words is shown, not eaten as markup
    generate_help = invoke("generate", "--help", env=wide).stdout
    flag_lines = [line for line in generate_help.splitlines() if "--json " in line or "--help " in line]
    assert len(flag_lines) == 2 and not any("bool" in line.lower() for line in flag_lines), flag_lines
    assert any("--max-new-tokens" in line and "INTEGER" in line for line in generate_help.splitlines())
    assert "UTF-8 text file to train on." in train_help  # the argument's help


def test_info_json_is_typed_with_snake_case_keys(char_model_file):
    data = json.loads(invoke("info", char_model_file, "--json").stdout)
    assert all(key.isidentifier() and key == key.lower() for key in data), list(data)
    assert data["layers"] == 2 and data["hidden_size"] == 16 and data["tied_weights"] is True
    assert data["format_version"] == 1 and data["state"] == ["h", "c"] and data["val_loss_nats"] == 1.5
    assert isinstance(data["size_bytes"], int) and data["size_bytes"] == char_model_file.stat().st_size
    assert data["providers_used"] == ["CPUExecutionProvider"]


def test_json_scores_are_named_for_what_they_are(char_model_file):
    samples = json.loads(invoke("generate", "-m", char_model_file, "-n", "10", "--samples", "2", "--seed", "1",
                                "--json").stdout)["sequences"]
    assert all(set(s) == {"index", "text", "tokens", "finish_reason", "logprob"} and s["logprob"] < 0 for s in samples)
    beams = json.loads(invoke("generate", "-m", char_model_file, "-n", "10", "--beams", "3", "--num-return", "2",
                              "--length-penalty", "1", "--json").stdout)["sequences"]
    for s in beams:
        assert s["beam_score"] == pytest.approx(s["logprob"] / s["tokens"])


def test_score_reports_progress_by_tokens(char_model_file, tmp_path):
    from rnngen.model.runtime import RnnModel
    from rnngen.scoring import score_file

    text = tmp_path / "t.txt"
    text.write_text("to be or not to be\n" * 200)  # 3,800 tokens: four segments of 1,024 at most
    seen = []
    result = score_file(RnnModel.load(char_model_file), text, segment_tokens=1024,
                        on_progress=lambda tokens, done: seen.append((tokens, done)))
    assert [t for t, _ in seen] == [1024, 2048, 3072, 3800] and seen[-1] == (result.tokens, text.stat().st_size)
    quiet = invoke("score", char_model_file, text)  # not a terminal: no bar, no empty line on stderr
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_export_refuses_directories_and_missing_folders_first(tmp_path):
    pytest.importorskip("torch")
    from rnngen.checks import check_output_file
    from rnngen.errors import OverwriteRefusedError

    with pytest.raises(OverwriteRefusedError, match="is a directory; give a file name in it"):
        check_output_file(tmp_path, force=False)  # said first, not "use --force"
    with pytest.raises(OverwriteRefusedError, match="does not exist; create it first"):
        check_output_file(tmp_path / "no" / "m.onnx", force=True)
    one_line_error(invoke("export", tmp_path, "-o", tmp_path), "is a directory")


def test_train_files_share_one_mode_and_ctrl_c_exits_130(corpus_file, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from rnngen.training.trainer import Trainer

    run = tmp_path / "run"
    common = ["--hidden", "16", "--layers", "1", "--eval-every", "2", "--seq-len", "16", "--batch-size", "4",
              "--threads", "1", "--sample-tokens", "0"]
    assert invoke("train", corpus_file, "--out", run, "--steps", "2", *common).exit_code == 0
    modes = {name: stat.S_IMODE((run / name).stat().st_mode) for name in ("last.safetensors", "best.safetensors",
                                                                          "last.json", "best.json")}
    assert len(set(modes.values())) == 1, modes

    original = Trainer.run

    def ctrl_c_during_first_step(self):
        self.request_stop()  # what the SIGINT handler does
        original(self)

    monkeypatch.setattr(Trainer, "run", ctrl_c_during_first_step)
    stopped = invoke("train", corpus_file, "--resume", run, "--steps", "6")
    assert stopped.exit_code == 130, stopped.output
    assert "stopped at step 3; continue with" in stopped.stdout
    assert json.loads((run / "last.json").read_text())["step"] == 3


def test_long_run_hint():
    from rnngen.cli.train_progress import long_run_hint

    assert long_run_hint(10 * 60, 5000) is None
    hint = long_run_hint(80 * 60, 1500)
    assert "about 1 h 20 min" in hint and "--hidden 256" in hint
