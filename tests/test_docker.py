"""The containers, checked without a Docker engine: lint, COPY sources, and the image's own commands."""

import glob
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "docker" / "Dockerfile.gpu", ROOT / "docker" / "Dockerfile.cpu"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) of the final stage, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if raw.strip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").rstrip() + " " if raw.endswith("\\") else raw
        if not raw.endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    parsed = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]
    last_from = max(i for i, (op, _) in enumerate(parsed) if op == "FROM")
    return parsed[last_from:]


def image_env(path: Path) -> dict[str, str]:
    env = {}
    for op, rest in instructions(path):
        if op == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (it comes with the test extra)")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_exists_and_the_image_is_configured(dockerfile):
    ops = instructions(dockerfile)
    copies = [rest for op, rest in ops if op == "COPY"]
    assert copies
    for rest in copies:
        *sources, _dest = shlex.split(rest)
        for source in sources:
            assert glob.glob(str(ROOT / source)), f"{dockerfile.name}: COPY source {source} does not exist"
    names = [op for op, _ in ops]
    assert "USER" in names and dict(ops)["USER"] not in ("root", "0")
    assert {"EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "VOLUME"} <= set(names)
    env = image_env(dockerfile)
    assert {"RNNGEN_PORT", "RNNGEN_METRICS_PORT", "RNNGEN_HOST", "RNNGEN_MODEL_DIRS"} <= set(env)
    exposed = " ".join(rest for op, rest in ops if op == "EXPOSE").split()
    assert env["RNNGEN_PORT"] in exposed and env["RNNGEN_METRICS_PORT"] in exposed
    if dockerfile.name.endswith("gpu"):
        text = dockerfile.read_text()
        assert "cuda:13" in text and "cudnn" in text and "onnxruntime-gpu" in text
    assert not any("torch" in rest for op, rest in ops if op == "RUN")  # the runtime only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_images_entrypoint_starts_a_healthy_server(dockerfile, tmp_path):
    """ENTRYPOINT and HEALTHCHECK as the image runs them, outside a container, with the image's ENV."""
    ops = dict(instructions(dockerfile))
    entrypoint = json.loads(ops["ENTRYPOINT"])
    healthcheck = json.loads(ops["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert entrypoint[:2] == ["rnngen", "serve"] and healthcheck[:2] == ["rnngen", "health"]
    env = {k: v for k, v in image_env(dockerfile).items() if k != "PATH"}
    paths = {"/opt/rnngen/models": str(ROOT / "exported"), "/models": str(tmp_path / "volume")}
    env["RNNGEN_MODEL_DIRS"] = os.pathsep.join(paths[d] for d in env["RNNGEN_MODEL_DIRS"].split(os.pathsep))
    env.update(RNNGEN_HOST="127.0.0.1", RNNGEN_PORT=str(free_port()), RNNGEN_METRICS_PORT=str(free_port()),
               RNNGEN_DEVICE="cpu")
    run_env = {**os.environ, **env}
    server = subprocess.Popen([sys.executable, "-m", "rnngen", *entrypoint[1:]], env=run_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, health = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            health = subprocess.run([sys.executable, "-m", "rnngen", *healthcheck[1:]], env=run_env,
                                    capture_output=True, text=True, timeout=30)
            if health.returncode == 0:
                break
            time.sleep(0.5)
        assert health.returncode == 0, (health.stdout, health.stderr, server.poll())
        assert "SERVING" in health.stdout
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{env['RNNGEN_METRICS_PORT']}/metrics", timeout=5).read()
        assert b"rnngen_active_streams" in metrics
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        announced = server.stdout.read()
        for name in ("lstm", "gru", "rnn"):
            assert f"{name} (" in announced
    finally:
        if server.poll() is None:
            server.kill()
    down = subprocess.run([sys.executable, "-m", "rnngen", *healthcheck[1:]], env=run_env, capture_output=True, text=True)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_compose_file_builds_from_the_repository_and_scrapes_metrics():
    text = (ROOT / "docker" / "compose.yaml").read_text()
    assert "context: .." in text and "docker/Dockerfile.cpu" in text
    assert (ROOT / "docker" / "prometheus.yml").read_text().count("rnngen:9090") == 1
