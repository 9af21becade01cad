"""Stateless replicas: Kubernetes manifests checked against the API schemas, and a session moving between servers."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rnngen.serving.client import RnngenClient
from rnngen.serving.metrics import ServerMetrics
from rnngen.decoding.params import GenerationParams

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))


def documents():
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_manifests_validate_against_the_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate")
    assert MANIFESTS
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                kv.validate(doc, "1.37.0", strict=True)  # raises on any schema error


def test_manifests_fit_the_server():
    docs = {doc["kind"]: doc for doc in documents()}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9090}
    assert container["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    assert container["livenessProbe"]["grpc"]["port"] == ports["grpc"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    grace = float(container["args"][container["args"].index("--grace") + 1])
    assert pod["terminationGracePeriodSeconds"] > grace
    env = {e["name"] for e in container["env"]}
    assert "RNNGEN_SESSION_SECRET" in env  # shared by every replica: sessions move freely
    assert docs["Service"]["spec"]["clusterIP"] == "None"  # headless: client-side gRPC balancing
    metric = docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    exported = {m.name for m in ServerMetrics().registry.collect()}
    assert metric in exported


def start_replica(model: Path, secret: str) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "RNNGEN_SESSION_SECRET": secret}
    proc = subprocess.Popen([sys.executable, "-m", "rnngen", "serve", "-m", str(model), "--port", "0", "--grace", "5"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"127\.0\.0\.1:(\d+)", line)
    assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, int(match.group(1))


def text_and_last(stream):
    messages = list(stream)
    return "".join(m.text for m in messages), messages[-1]


def test_a_session_continues_on_another_replica_after_its_server_stops(char_model_file):
    secret = "replica-secret-0123456789abcdef"
    replicas = [start_replica(char_model_file, secret) for _ in range(3)]
    try:
        params = GenerationParams(max_new_tokens=80, seed=21)
        (first_proc, first_port), (_, second_port), (_, third_port) = replicas
        with RnngenClient(f"127.0.0.1:{first_port}") as client:
            part1, last = text_and_last(client.generate("the ", params=params, return_session=True))
        first_proc.send_signal(signal.SIGTERM)  # the replica that served the session goes away
        assert first_proc.wait(20) == 0
        with RnngenClient(f"127.0.0.1:{second_port}") as client:
            part2, last = text_and_last(client.generate(session=last.session, params=params, return_session=True))
        with RnngenClient(f"127.0.0.1:{third_port}") as client:
            part3, _ = text_and_last(client.generate(session=last.session, params=params))
            whole, _ = text_and_last(client.generate("the ", params=GenerationParams(max_new_tokens=240, seed=21)))
        assert part1 + part2 + part3 == whole
    finally:
        for proc, _ in replicas:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
