"""Stateless replicas: Kubernetes manifests checked against the API schemas, and a session moving between servers."""

import os
import re
import signal
import subprocess
import sys
import tempfile
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


def start_replica(model: Path, secret: str, grace: str = "5") -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "RNNGEN_SESSION_SECRET": secret}
    # stderr goes to a file: a pipe nobody reads while the server runs would stop it once full
    errors = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "rnngen", "serve", "-m", str(model), "--port", "0", "--grace", grace],
                            env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
    line = proc.stdout.readline()
    match = re.search(r"127\.0\.0\.1:(\d+)", line)
    if not match:
        proc.wait(10)
        errors.seek(0)
    assert match, (line, errors.read())
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


def test_rolling_restart_three_servers_stopped_in_turn_lose_no_stream(char_model_file):
    """Streams move from server to server as each stops; the text is that of one uninterrupted run."""
    import threading
    import time

    from rnngen.decoding.generation import generate
    from rnngen.model.runtime import RnnModel
    from rnngen.serving.server import RnngenServer, ServerConfig

    secret = b"rolling-secret-0123456789abcdef"
    servers = [RnngenServer(ServerConfig(models=[char_model_file], port=0, session_secret=secret)).start() for _ in range(3)]
    jobs = [GenerationParams(max_new_tokens=6000, temperature=0.0),
            GenerationParams(max_new_tokens=6000, temperature=0.0, seed=1),
            GenerationParams(max_new_tokens=6000, temperature=0.9, seed=7),
            GenerationParams(max_new_tokens=6000, temperature=1.3, seed=8)]
    prompts = ["the ", "to be", "a stitch", "all that"]
    results = [None] * len(jobs)
    addresses = ",".join(f"127.0.0.1:{s.port}" for s in servers)

    def run(i):
        with RnngenClient(addresses) as client:
            messages = list(client.generate(prompts[i], params=jobs[i], return_token_ids=True))
        results[i] = messages

    def active(server):
        return server.models[0].scheduler.active

    def wait_for(predicate, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not predicate():
            time.sleep(0.005)
        return predicate()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    try:
        for t in threads:
            t.start()
        for stopping, following in ((servers[0], servers[1]), (servers[1], servers[2])):
            assert wait_for(lambda: active(stopping) == len(jobs))  # every stream runs here now
            stopping.drain(grace_s=0.0)  # the grace period is over at once: each stream gets its session token
            assert wait_for(lambda: active(following) > 0)
        for t in threads:
            t.join(60)
    finally:
        for s in servers:
            s.shutdown()
    local = RnnModel.load(char_model_file, device="cpu")
    for prompt, params, messages in zip(prompts, jobs, results):
        assert messages is not None
        assert "".join(m.text for m in messages) == generate(local, prompt, params).text
        assert sum(len(m.token_ids) for m in messages) == 6000
        assert [m.finish_reason for m in messages if m.finish_reason] == [1]  # LENGTH, once, at the end: no trace of a move
        assert messages[-1].usage.completion_tokens == 6000 and messages[-1].usage.prompt_tokens == len(prompt)


def test_a_drain_that_cuts_streams_exits_zero_and_hands_each_its_session(char_model_file):
    from rnngen.v1 import rnngen_pb2 as pb
    from rnngen.v1 import rnngen_pb2_grpc as pb_grpc
    import grpc

    proc, port = start_replica(char_model_file, "exit-secret-0123456789abcdef", grace="0.5")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GeneratorStub(channel)
            streams = [stub.Generate(pb.GenerateRequest(prompt="the ", params=pb.GenerationParameters(
                max_new_tokens=10_000_000, seed=i))) for i in range(3)]
            for s in streams:
                next(s)
            proc.send_signal(signal.SIGTERM)
            lasts = [list(s)[-1] for s in streams]
        assert all(m.finish_reason == pb.FINISH_REASON_INTERRUPTED and m.session for m in lasts)
        assert proc.wait(30) == 0
        assert proc.stdout.read().strip().endswith("stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
