"""Plugins end to end: the example plugin package is pip-installed (into a folder of its own)
and every kind of addition it makes is used through the real CLI; broken plugins are
reported and skipped without breaking anything else."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rnngen.errors import InvalidParameterError
from rnngen.decoding.generation import generate
from rnngen.plugins import PluginRegistry, hookimpl, registry, reset_registry, resolve_model
from rnngen.model.runtime import RnnModel
from rnngen.decoding.params import GenerationParams

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin-example"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """`pip install` the example plugin into its own folder: importable only where PYTHONPATH names it."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "plugin-example"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))  # builds leave files behind
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    assert (target / "rnngen_example_plugin").is_dir()
    return target


def _write_dist(site: Path, name: str, entry_points: str, module: str | None = None, source: str = "") -> None:
    """A minimal installed distribution (what pip leaves behind) declaring entry points."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    if module:
        (site / f"{module}.py").write_text(source)


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("broken")
    _write_dist(site, "missing_import", "[rnngen]\nmissing = missing_module_that_is_not_there\n")
    _write_dist(site, "raising_hook", "[rnngen]\nraising = raising_hook\n", "raising_hook",
                "from rnngen.plugins import hookimpl\n\n"
                "@hookimpl\ndef register_logits_processors(register):\n    raise RuntimeError('boom in the hook')\n\n"
                "@hookimpl\ndef register_commands(app):\n    raise RuntimeError('boom in commands')\n")
    _write_dist(site, "greedy_names", "[rnngen]\ngreedy = greedy_names\n", "greedy_names",
                "from rnngen.plugins import hookimpl\n\n"
                "@hookimpl\ndef register_commands(app):\n"
                "    @app.command(name='generate')\n    def generate():\n        print('hijacked')\n\n"
                "@hookimpl\ndef register_tokenizers(register):\n    register('char', lambda data: None)\n")
    return site


def rnngen(*args, site: Path | None = None, cwd: Path | None = None, env: dict | None = None):
    environment = dict(os.environ)
    environment.pop("RNNGEN_PLUGINS", None)
    if site is not None:
        environment["PYTHONPATH"] = os.pathsep.join(str(s) for s in ([site] if isinstance(site, Path) else site))
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "rnngen", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=environment, timeout=300)


def test_plugins_lists_builtins_and_the_installed_plugin(plugin_site):
    result = rnngen("plugins", "--json", site=plugin_site)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    plugins = {p["name"]: p for p in data["plugins"]}
    # rnngen's commands belong to the CLI itself, not to the built-ins plugin
    assert "command" not in plugins["builtins"]["provides"]
    assert plugins["builtins"]["provides"]["tokenizer"] == ["char", "byte", "word"]
    example = plugins["example"]
    assert example["status"] == "loaded" and example["source"] == "rnngen-example-plugin 0.1.0"
    assert example["provides"] == {"command": ["vocab"], "logits processor": ["vowel-bias"],
                                   "tokenizer": ["lowercase-char"], "model source": ["zip"], "inspect feature": ["vowel"]}
    assert data["logits_processors"]["ban"]["plugin"] == "builtins"
    assert data["tokenizers"]["lowercase-char"]["plugin"] == "example"
    # The table view lists the same
    table = rnngen("plugins", site=plugin_site)
    assert "rnngen-example-plugin 0.1.0" in table.stdout and "vowel-bias" in table.stdout


def test_plugin_command_runs_and_shows_in_help(plugin_site, char_model_file):
    help_text = rnngen("--help", site=plugin_site).stdout
    assert "vocab" in help_text
    result = rnngen("vocab", char_model_file, site=plugin_site)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("0\t")
    assert len(result.stdout.splitlines()) == 31  # the fixture corpus has 31 distinct characters
    assert "vocab" not in rnngen("--help").stdout  # not installed there


def test_plugin_processor_changes_generation(plugin_site, char_model_file):
    base = ["generate", "-m", char_model_file, "-n", "300", "--seed", "5", "-q", "--prompt", "a"]
    plain = rnngen(*base, site=plugin_site)
    biased = rnngen(*base, "--processor", "vowel-bias:6", site=plugin_site)
    assert plain.returncode == 0 and biased.returncode == 0, biased.stderr
    vowels = lambda s: sum(ch in "aeiou" for ch in s) / max(1, len(s))  # noqa: E731
    assert vowels(biased.stdout) > vowels(plain.stdout) + 0.2
    bad = rnngen(*base, "--processor", "vowel-bias:lots", site=plugin_site)
    assert bad.returncode == 1 and "'lots' is not a number" in bad.stderr and "Traceback" not in bad.stderr
    missing = rnngen(*base, "--processor", "vowel-bias:1")  # plugin not installed
    assert missing.returncode == 1 and "'vowel-bias' is not one of ban, only" in missing.stderr


def test_plugin_tokenizer_trains_exports_and_generates(plugin_site, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The Cat sat On the MAT.\nA dog Ran to THE cat.\n" * 80)
    run = tmp_path / "run"
    trained = rnngen("train", corpus, "-o", run, "--tokenizer", "lowercase-char", "--layers", "1", "--hidden", "16",
                     "--steps", "4", "--seq-len", "16", "--batch-size", "4", "--eval-every", "4",
                     "--sample-tokens", "0", site=plugin_site)
    assert trained.returncode == 0, trained.stderr
    model = tmp_path / "lower.onnx"
    exported = rnngen("export", run, "-o", model, site=plugin_site)
    assert exported.returncode == 0, exported.stderr
    # Upper case is folded by the tokenizer: an upper-case prompt is in its vocabulary.
    out = rnngen("generate", "-m", model, "-p", "THE CAT", "-n", "20", "--seed", "1", "-q", site=plugin_site)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("THE CAT") and out.stdout[7:].strip() == out.stdout[7:].strip().lower()
    # Without the plugin the model names a tokenizer nobody provides: a clear error, not a crash.
    without = rnngen("generate", "-m", model, "-n", "5")
    assert without.returncode == 1
    assert "tokenizer kind 'lowercase-char' is not one of byte, char, word" in without.stderr


def test_plugin_model_source(plugin_site, char_model_file, tmp_path):
    archive = tmp_path / "models.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(char_model_file, "inside/tiny.onnx")
    result = rnngen("info", f"zip:{archive}!inside/tiny.onnx", "--json", site=plugin_site)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cell"] == "lstm"
    missing = rnngen("info", f"zip:{archive}!nope.onnx", site=plugin_site)
    assert missing.returncode == 1 and "nope.onnx" in missing.stderr
    unknown = rnngen("info", f"zip:{archive}!inside/tiny.onnx")
    assert unknown.returncode == 1 and "no model source 'zip'; known: file, name" in unknown.stderr


def test_broken_plugins_are_reported_and_skipped(broken_site, plugin_site, char_model_file):
    result = rnngen("plugins", "--json", site=[broken_site, plugin_site])
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["missing"]["status"] == "failed"
    assert "ModuleNotFoundError" in plugins["missing"]["errors"][0]
    assert plugins["raising"]["status"] == "failed"
    assert any("boom in the hook" in e for e in plugins["raising"]["errors"])
    assert any("boom in commands" in e for e in plugins["raising"]["errors"])
    assert any("command 'generate' is already provided by rnngen" in e for e in plugins["greedy"]["errors"])
    assert any("tokenizer 'char' is already provided by builtins" in e for e in plugins["greedy"]["errors"])
    assert plugins["example"]["status"] == "loaded"  # the good plugin beside them still works
    assert "plugin 'missing'" in result.stderr and "skipped" in result.stderr
    # The CLI goes on working: the built-in generate (not the hijacker's), processors and all.
    gen = rnngen("generate", "-m", char_model_file, "-n", "20", "--seed", "2", "-q", "--processor", "ban:e",
                 site=[broken_site, plugin_site])
    assert gen.returncode == 0, gen.stderr
    assert "hijacked" not in gen.stdout and gen.stdout.strip() and "e" not in gen.stdout
    # And they can be switched off
    quiet = rnngen("plugins", "--json", site=[broken_site], env={"RNNGEN_DISABLE_PLUGINS": "missing,raising,greedy"})
    assert quiet.stderr == "" and {p["status"] for p in json.loads(quiet.stdout)["plugins"][1:]} == {"disabled"}
    none = rnngen("plugins", "--json", site=[broken_site, plugin_site], env={"RNNGEN_PLUGINS": "0"})
    assert [p["name"] for p in json.loads(none.stdout)["plugins"]] == ["builtins"]


def test_builtin_processors_in_the_engine(char_model_file):
    model = RnnModel.load(char_model_file, device="cpu")
    banned = set("aeiou ")
    params = GenerationParams(max_new_tokens=200, seed=4, processors=("ban:aeiou ",))
    text = generate(model, "b", params).sequences[0].text
    assert len(text) == 200 and not banned & set(text)
    only = generate(model, "b", GenerationParams(max_new_tokens=100, seed=4, processors=("only:xyz",))).sequences[0].text
    assert set(only) <= set("xyz") and len(only) == 100
    # A processor row is batch-invariant like every other row: sample 0 of three is the text made alone
    batch = generate(model, "b", GenerationParams(max_new_tokens=50, seed=9, n=3, processors=("ban:e",)))
    alone = generate(model, "b", GenerationParams(max_new_tokens=50, seed=9, processors=("ban:e",)))
    assert all("e" not in s.text for s in batch.sequences)
    assert batch.sequences[0].text == alone.sequences[0].text and batch.sequences[1].text != alone.sequences[0].text
    with pytest.raises(InvalidParameterError, match="none of 'QQ' is in the model's vocabulary"):
        generate(model, "b", GenerationParams(max_new_tokens=5, processors=("ban:QQ",)))
    beams = generate(model, "b", GenerationParams(max_new_tokens=30, num_beams=3, num_return_sequences=3, processors=("ban:e",)))
    assert all("e" not in s.text for s in beams.sequences)  # beams are engine rows: their processors apply
    for beams in (1, 2):
        with pytest.raises(InvalidParameterError, match="processor ban:xyz: no token is left to choose"):
            generate(model, "b", GenerationParams(max_new_tokens=5, num_beams=beams, processors=("only:xyz", "ban:xyz")))


def test_model_names_resolve_through_the_name_source(char_model_file, tmp_path, monkeypatch):
    monkeypatch.setenv("RNNGEN_MODEL_DIRS", str(char_model_file.parent))
    assert resolve_model(char_model_file.stem) == str(char_model_file.parent / f"{char_model_file.stem}.onnx")
    assert resolve_model(str(char_model_file)) == str(char_model_file)
    with pytest.raises(InvalidParameterError, match="neither a file nor a model named nothing.onnx"):
        resolve_model("nothing")


def test_registry_reports_each_problem_once():
    import typer

    class Hijacker:
        @hookimpl
        def register_commands(self, app):
            app.command(name="generate")(lambda: None)

        @hookimpl
        def register_tokenizers(self, register):
            register("char", lambda data: None)

    lines = []
    reg = PluginRegistry(load_entry_points=False, report=lines.append)
    reg.add_plugin(Hijacker(), "hijacker", "test")
    reg.add_plugin(ImportError("no module"), "absent", "test")
    assert set(reg.tokenizers()) == {"char", "byte", "word"} and reg.tokenizers()["char"].plugin == "builtins"
    for _ in range(2):  # the CLI can be built more than once in a process
        app = typer.Typer()
        app.command(name="generate")(lambda: None)  # the CLI adds its own commands first
        reg.add_commands(app)
        assert [c.name or c.callback.__name__ for c in app.registered_commands].count("generate") == 1
    assert reg.plugins["absent"].status == "failed" and reg.plugins["hijacker"].status == "loaded"
    assert len(lines) == 3, lines  # the import failure, the tokenizer and the command, once each
    assert sum("command 'generate'" in line for line in lines) == 1
    reset_registry()
    assert registry() is registry()
