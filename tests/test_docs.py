"""The README's quick start is what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_both_quick_start_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick, flags=re.S)
    assert len(commands) == 2, commands
    assert "generate --model exported/lstm.onnx" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command.count("\n") == 0, "each quick-start step is one command line"
        assert command in ci


def test_shipped_models_are_listed_and_within_size_limits():
    sizes = {name: (ROOT / "exported" / f"{name}.onnx").stat().st_size for name in ("lstm", "gru", "rnn")}
    assert all(s <= 12 * 1024**2 for s in sizes.values()), sizes
    assert sum(sizes.values()) <= 24 * 1024**2, sizes
    notes = (ROOT / "exported" / "README.md").read_text()
    for name in sizes:
        assert f"exported/{name}.onnx" in notes


def test_cli_reference_is_current():
    import runpy

    generator = runpy.run_path(str(ROOT / "scripts" / "generate_cli_reference.py"), run_name="reference")
    committed = (ROOT / "docs" / "cli.md").read_text()
    assert generator["reference"]() == committed, "docs/cli.md is stale: run python scripts/generate_cli_reference.py"
    for command in ("train", "export", "generate", "info", "score", "serve", "health"):
        assert f"## rnngen {command}" in committed


def test_help_lists_completion_and_version():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "rnngen", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "--install-completion" in out and "--version" in out
