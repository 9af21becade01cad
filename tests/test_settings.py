"""Options from the command line, RNNGEN_* environment variables and the config file, in that order."""

import json

import pytest
from typer.testing import CliRunner

from rnngen.cli import create_app

app = create_app()


def generated_tokens(result) -> int:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["sequences"][0]["tokens"]


@pytest.fixture
def config_home(tmp_path, monkeypatch):
    home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.delenv("RNNGEN_CONFIG", raising=False)
    monkeypatch.delenv("RNNGEN_GENERATE_MAX_NEW_TOKENS", raising=False)
    (home / "rnngen").mkdir(parents=True)
    return home / "rnngen" / "config.toml"


def test_precedence_command_line_then_environment_then_file(config_home, char_model_file):
    run = CliRunner().invoke
    base = ["generate", "-m", str(char_model_file), "--json", "--temperature", "0"]
    assert generated_tokens(run(app, base)) == 500  # the built-in default
    config_home.write_text("[generate]\nmax-new-tokens = 7\n")
    assert generated_tokens(run(app, base)) == 7  # the default config file
    env = {"RNNGEN_GENERATE_MAX_NEW_TOKENS": "9"}
    assert generated_tokens(run(app, base, env=env)) == 9  # the environment beats the file
    assert generated_tokens(run(app, [*base, "-n", "11"], env=env)) == 11  # the command line beats both


def test_explicit_config_file_and_boolean_and_list_options(config_home, char_model_file, tmp_path):
    plain = CliRunner().invoke(app, ["generate", "-m", str(char_model_file), "-n", "30", "-t", "0", "--json"])
    greedy = json.loads(plain.stdout)["sequences"][0]["text"]
    stop = greedy[-1]  # a character greedy decoding reaches
    explicit = tmp_path / "team.toml"
    explicit.write_text(f'[generate]\nmax-new-tokens = 30\ntemperature = 0\nstop = [{json.dumps(stop)}]\njson = true\n')
    result = CliRunner().invoke(app, ["--config", str(explicit), "generate", "-m", str(char_model_file)])
    assert result.exit_code == 0, result.output
    sequence = json.loads(result.stdout)["sequences"][0]
    assert sequence["finish_reason"] == "stop" and sequence["text"] == greedy[: greedy.index(stop)]
    via_env = CliRunner().invoke(app, ["generate", "-m", str(char_model_file)], env={"RNNGEN_CONFIG": str(explicit)})
    assert json.loads(via_env.stdout)["sequences"][0]["text"] == sequence["text"]


@pytest.mark.parametrize("content, message", [
    ("[generate\n", "is not valid TOML"),
    ("[generat]\ntemperature = 1\n", "[generat] is not a command; sections are"),
    ("[generate]\ntemprature = 1\n", "[generate] temprature is not an option of generate; options are"),
    ("generate = 3\n", "must be a [generate] table of options"),
])
def test_config_mistakes_are_named(config_home, char_model_file, content, message):
    config_home.write_text(content)
    result = CliRunner().invoke(app, ["generate", "-m", str(char_model_file)])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_wrong_value_type_in_config_names_the_option(config_home, char_model_file):
    config_home.write_text('[generate]\nmax-new-tokens = "lots"\n')
    result = CliRunner().invoke(app, ["generate", "-m", str(char_model_file)], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "Invalid value for '--max-new-tokens'" in result.stderr and "integer" in result.stderr


def test_missing_explicit_config_is_an_error(char_model_file, tmp_path):
    result = CliRunner().invoke(app, ["--config", str(tmp_path / "none.toml"), "generate", "-m", str(char_model_file)])
    assert result.exit_code == 1 and "none.toml is not a file" in result.stderr


def test_help_shows_each_options_environment_variable(config_home):
    result = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert "RNNGEN_GENERATE_TEMPERATURE" in result.stdout
    serve_help = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).stdout
    assert "RNNGEN_PORT" in serve_help and "RNNGEN_SERVE_GRACE" in serve_help
