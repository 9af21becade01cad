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


def test_every_documented_configuration_example_works(tmp_path, monkeypatch):
    """docs/configuration.md: each variable it names is read, each VAR=VALUE example sets its option, the TOML parses."""
    import re
    from pathlib import Path

    import typer.main

    from rnngen.cli.settings import config_defaults

    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    group = typer.main.get_command(app)
    read_by = {}  # variable -> (command, option)
    for name, command in group.commands.items():
        for p in command.params:
            for variable in [p.envvar] if isinstance(p.envvar, str) else p.envvar or []:
                read_by.setdefault(variable, (name, p))
    source = "".join(path.read_text() for path in (Path(__file__).resolve().parent.parent / "rnngen").rglob("*.py"))
    for variable in set(re.findall(r"RNNGEN_[A-Z_]*[A-Z]", doc)) - {"RNNGEN_COMMAND", "RNNGEN_OPTION"}:
        assert variable in read_by or f'"{variable}"' in source, f"{variable} is documented but read nowhere"
    for variable, value in re.findall(r"`(RNNGEN_[A-Z_]+)=([^`]+)`", doc):
        if variable not in read_by:  # not an option's (RNNGEN_PLUGINS=0: tests/test_plugins.py)
            continue
        name, param = read_by[variable]
        monkeypatch.setenv(variable, value)
        ctx = group.commands[name].make_context(name, [])
        assert ctx.params[param.name] == param.type_cast_value(ctx, value) != param.get_default(ctx), variable
    toml = re.search(r"```toml\n(.*?)```", doc, flags=re.S).group(1)
    (tmp_path / "c.toml").write_text("\n".join(line.strip() for line in toml.splitlines()))
    defaults = config_defaults(tmp_path / "c.toml", group)
    assert defaults["generate"]["top_p"] == 0.95 and defaults["serve"]["max_active"] == 128


def test_boolean_flag_from_its_environment_variable(char_model_file):
    result = CliRunner().invoke(app, ["generate", "-m", str(char_model_file), "-n", "3"], env={"RNNGEN_GENERATE_JSON": "1"})
    assert generated_tokens(result) == 3  # --json is RNNGEN_GENERATE_JSON, as the option is spelled
