"""A real gRPC server on 127.0.0.1: streaming, batching, cancel, overload, drain, TLS, auth, sessions."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnngen.serving.client import RnngenClient
from rnngen.decoding.generation import generate
from rnngen.model.runtime import RnnModel
from rnngen.decoding.params import GenerationParams
from rnngen.errors import RnngenError
from rnngen.serving import server as server_module
from rnngen.serving.server import RnngenServer, ServerConfig
from rnngen.v1 import rnngen_pb2 as pb
from rnngen.v1 import rnngen_pb2_grpc as pb_grpc

from conftest import is_split_character

SECRET = b"test-secret-0123456789abcdef"


@pytest.fixture
def start_server(char_model_file):
    servers = []

    def start(**kw):
        kw.setdefault("session_secret", SECRET)
        config = ServerConfig(models=[kw.pop("models", char_model_file)], host="127.0.0.1", port=0, **kw)
        server = RnngenServer(config).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.shutdown()


def client_for(server, **kw):
    return RnngenClient(f"127.0.0.1:{server.port}", **kw)


def collect(stream):
    messages = list(stream)
    return "".join(m.text for m in messages), messages[-1]


def drain_until_cancelled(stream, ends: list) -> None:
    """Read a stream until it is cancelled; how it ended goes into `ends` (checked by the test's own thread)."""
    try:
        for _ in stream:
            pass
        ends.append("finished")
    except grpc.RpcError as exc:
        ends.append(exc.code())


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_streams_text_and_reports_usage(start_server, char_model_file):
    server = start_server()
    with client_for(server) as client:
        long = client.generate("the ", params=GenerationParams(max_new_tokens=1_000_000, seed=3))
        first = next(long)  # text arrives while the stream is far from done
        assert first.text and first.finish_reason == pb.FINISH_REASON_UNSPECIFIED and not first.usage.completion_tokens
        long.cancel()
        # Long enough to span several delivery intervals however fast the steps are here (50 tokens
        # of the test model can all come in the first message).
        params = GenerationParams(max_new_tokens=2000, seed=3)
        messages = list(client.generate("the ", params=params, return_token_ids=True))
    assert len(messages) >= 2
    text = "".join(m.text for m in messages)
    last = messages[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == 4 and last.usage.completion_tokens == 2000
    assert sum(len(m.token_ids) for m in messages) == 2000
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    local = generate(RnnModel.load(char_model_file, device="cpu"), "the ", params)
    assert text == local.text


def test_the_servers_onnxruntime_threads_stop_spinning_after_each_step_and_the_clis_do_not(start_server, char_model_file):
    """Spinning threads would take the cores the event loop needs between steps (see
    SessionOptions.spin_between_runs); decoding alone keeps them spinning for the next step."""
    key = "session.force_spinning_stop"
    model = start_server().models[0].model
    for session in (model.step_session, model.prefill_session, model.run_session):
        assert session.get_session_options().get_session_config_entry(key) == "1"
    with pytest.raises(Exception, match=key):  # not set at all
        RnnModel.load(char_model_file, device="cpu").step_session.get_session_options().get_session_config_entry(key)


def test_concurrent_streams_share_steps_and_decode_as_alone(start_server, char_model_file):
    server = start_server()
    engine = server.models[0].scheduler._engines[0]
    batch_sizes = []
    real_step = engine.step
    engine.step = lambda: batch_sizes.append(len(engine)) or real_step()
    local = RnnModel.load(char_model_file, device="cpu")
    # Long enough that the streams overlap however fast the steps are here.
    jobs = [("the ", GenerationParams(max_new_tokens=1500, seed=s, temperature=0.5 + s / 10, top_k=s % 5)) for s in range(12)]
    results = [None] * len(jobs)

    def run(i):
        with client_for(server) as client:
            results[i] = collect(client.generate(jobs[i][0], params=jobs[i][1]))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for (prompt, params), text in zip(jobs, results):
        assert text == generate(local, prompt, params).text
    assert max(batch_sizes) > 1  # streams were decoded together, one model call for several
    assert len(batch_sizes) < sum(p.max_new_tokens for _, p in jobs)


def test_cancel_mid_stream_frees_the_row(start_server):
    server = start_server()
    scheduler = server.models[0].scheduler
    with client_for(server) as client:
        call = client.generate("a", params=GenerationParams(max_new_tokens=100_000, seed=1))
        next(call)
        assert scheduler.active == 1
        call.cancel()
        assert wait_until(lambda: scheduler.active == 0)
        again = collect(client.generate("a", params=GenerationParams(max_new_tokens=5, seed=1)))[1]
        assert again.usage.completion_tokens == 5


def test_deadline_ends_the_stream_and_frees_the_row(start_server):
    server = start_server(metrics_port=0)
    with client_for(server) as client:
        with pytest.raises(grpc.RpcError) as err:
            collect(client.generate("a", params=GenerationParams(max_new_tokens=10_000_000), timeout=0.3))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: server.models[0].scheduler.active == 0)
    assert wait_until(lambda: requests_counted(server) == {"DEADLINE_EXCEEDED": 1.0}), requests_counted(server)


def health_status(port, service=""):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


def test_overload_is_refused_at_once_while_accepted_streams_go_on(start_server):
    server = start_server(max_active=1, max_queued=1)
    with client_for(server) as client:
        first = client.generate("a", params=GenerationParams(max_new_tokens=100_000, seed=1))
        next(first)
        second = client.generate("b", params=GenerationParams(max_new_tokens=100_000, seed=2))  # queued
        assert wait_until(lambda: server.models[0].scheduler.queued == 1)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            next(client.generate("c", params=GenerationParams(max_new_tokens=10)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at capacity" in err.value.details()
        assert time.monotonic() - t0 < 2.0
        assert health_status(server.port) == health_pb2.HealthCheckResponse.SERVING
        assert next(first).text  # the accepted stream keeps going
        first.cancel()
        assert next(second).text  # the queued one gets the freed row
        assert server.models[0].scheduler.queued == 0
        second.cancel()


def test_drain_stops_accepting_and_finishes_in_flight_streams(start_server):
    server = start_server()
    with client_for(server) as client:
        running = client.generate("a", params=GenerationParams(max_new_tokens=3000, seed=1))
        next(running)
        drainer = threading.Thread(target=server.drain, kwargs={"grace_s": 20})
        drainer.start()
        assert wait_until(lambda: health_status(server.port) == health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(grpc.RpcError) as err:
            next(client.generate("b", params=GenerationParams(max_new_tokens=5)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        last = list(running)[-1]
        assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == 3000
        drainer.join(10)
        assert not drainer.is_alive()


def test_sigterm_drains_and_exits_zero(char_model_file, tmp_path):
    # stderr goes to a file: a pipe nobody reads while the server runs would stop it once full
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "rnngen", "serve", "-m", str(char_model_file), "--port", "0",
                                 "--grace", "20"], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
        with RnngenClient(f"127.0.0.1:{port}") as client:
            stream = client.generate("a", params=GenerationParams(max_new_tokens=2000, seed=1))
            next(stream)
            proc.send_signal(signal.SIGTERM)
            last = list(stream)[-1]
            assert last.usage.completion_tokens == 2000
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"exit {code}; stderr ends: {errors.read_text()[-2000:]!r}"
        assert "draining" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_session_resume_continues_exactly(start_server, char_model_file):
    server_a = start_server()
    server_b = start_server()  # another replica sharing the secret
    params = GenerationParams(max_new_tokens=60, seed=11, stop=())
    with client_for(server_a) as a, client_for(server_b) as b:
        first, last = collect(a.generate("to be", params=params, return_session=True))
        assert last.session
        rest, last2 = collect(b.generate(session=last.session, params=params, return_session=True))
        more, _ = collect(a.generate(session=last2.session, params=params))
        whole, _ = collect(a.generate("to be", params=GenerationParams(max_new_tokens=180, seed=11)))
    assert first + rest + more == whole
    local = generate(RnnModel.load(char_model_file, device="cpu"), "to be", GenerationParams(max_new_tokens=180, seed=11))
    assert whole == local.text


def test_session_resume_is_exact_with_penalties_stops_and_a_byte_model(start_server, byte_model_file):
    """Split where a UTF-8 character is unfinished, with every stateful parameter on: the resumed stream
    on another replica gives the uninterrupted tokens, text and per-token log-probabilities."""
    server_a, server_b = start_server(models=byte_model_file), start_server(models=byte_model_file)

    def params(count):
        return GenerationParams(max_new_tokens=count, seed=3, temperature=1.0, top_k=40, repetition_penalty=1.2,
                                presence_penalty=0.3, frequency_penalty=0.2, no_repeat_ngram_size=2, stop=("zz",),
                                processors=("ban:q",), introspect=True, top_alternatives=0)

    def run(client, **kw):
        messages = list(client.generate(return_token_ids=True, **kw))
        return ("".join(m.text for m in messages), [t for m in messages for t in m.token_ids],
                [d.logprob for m in messages for d in m.details], messages[-1])

    with client_for(server_a) as a, client_for(server_b) as b:
        whole_text, whole_tokens, whole_logprobs, _ = run(a, prompt="to be or not", params=params(80))
        n = next(n for n in range(15, 70) if is_split_character(whole_tokens, n))
        text, tokens, logprobs, last = run(a, prompt="to be or not", params=params(n), return_session=True)
        text2, tokens2, logprobs2, _ = run(b, session=last.session, params=params(80 - n))
    assert tokens + tokens2 == whole_tokens
    assert text + text2 == whole_text
    assert logprobs + logprobs2 == whole_logprobs


def test_tampered_foreign_expired_and_wrong_model_tokens_are_refused(start_server, char_model_file, byte_model_file):
    server = start_server()
    other = start_server(session_secret=b"another-secret-0123456789")
    expiring = start_server(session_ttl_s=0.0)
    two = start_server(models=byte_model_file)
    with client_for(server) as c:
        token = collect(c.generate("a", params=GenerationParams(max_new_tokens=5, seed=1), return_session=True))[1].session
        tampered = bytearray(token)
        tampered[40] ^= 1

        def refused(client, tok):
            with pytest.raises(grpc.RpcError) as err:
                collect(client.generate(session=bytes(tok), params=GenerationParams(max_new_tokens=5)))
            return err.value.code(), err.value.details()

        assert refused(c, tampered) == (grpc.StatusCode.INVALID_ARGUMENT, "session: signature does not match (tampered, or issued by a server with another secret)")
        assert refused(c, b"garbage")[0] == grpc.StatusCode.INVALID_ARGUMENT
        with client_for(other) as o:
            code, details = refused(o, token)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "signature" in details
        with client_for(expiring) as e:
            short = collect(e.generate("a", params=GenerationParams(max_new_tokens=3), return_session=True))[1].session
            time.sleep(1.1)
            code, details = refused(e, short)
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "expired" in details
    two_token_server = start_server(models=char_model_file)
    with client_for(two_token_server) as c2, client_for(two) as b:
        token2 = collect(c2.generate("a", params=GenerationParams(max_new_tokens=3), return_session=True))[1].session
        code, details = refused(b, token2)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "another model" in details


@pytest.mark.parametrize("params,needle", [
    (pb.GenerationParameters(temperature=float("nan")), "temperature: nan"),
    (pb.GenerationParameters(temperature=-1), "temperature: -1.0"),
    (pb.GenerationParameters(top_p=0.0), "params.top_p: 0.0 is outside (0, 1]"),
    (pb.GenerationParameters(top_k=10**6), "top_k: 1000000 is larger than the model's vocabulary"),
    (pb.GenerationParameters(max_new_tokens=0), "max_new_tokens: 0"),
    (pb.GenerationParameters(seed=2**64 - 1), "seed: 18446744073709551615"),
    (pb.GenerationParameters(repetition_penalty=float("inf")), "repetition_penalty: inf"),
    (pb.GenerationParameters(on_unknown="ignore"), "on_unknown: 'ignore'"),
    (pb.GenerationParameters(stop=[""]), "stop: '' is not a non-empty string"),
])
def test_invalid_parameters_name_field_value_and_range(start_server, params, needle):
    server = start_server()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GeneratorStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(prompt="a", params=params)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()


def test_a_prompt_over_the_limit_is_refused_naming_it(start_server):
    server = start_server(max_prompt_tokens=50)
    with client_for(server) as c:
        with pytest.raises(grpc.RpcError) as err:
            collect(c.generate("the " * 13, params=GenerationParams(max_new_tokens=3)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "prompt: 52 tokens is more than the limit of 50 tokens (--max-prompt-tokens)"
        text, last = collect(c.generate("the " * 12 + "to", params=GenerationParams(max_new_tokens=3)))  # at the limit
        assert last.usage.prompt_tokens == 50


def test_short_prompts_set_up_on_the_loop_and_long_ones_in_the_prefill_threads_decode_alike(start_server, char_model_file):
    """A prompt up to INLINE_PROMPT_CHARS is set up on the event loop, a longer one in the prefill
    threads: both decode what they decode locally, and both are refused over --max-prompt-tokens."""
    from rnngen.serving.service import INLINE_PROMPT_CHARS

    server = start_server()
    local = RnnModel.load(char_model_file, device="cpu")
    short, long = "to be or not ", "the " * (INLINE_PROMPT_CHARS // 4 + 1)
    params = GenerationParams(max_new_tokens=30, seed=4)
    with client_for(server) as c:
        for prompt in (short, long):
            assert collect(c.generate(prompt, params=params))[0] == generate(local, prompt, params).text
    limited = start_server(max_prompt_tokens=10, max_active=1, max_queued=1)  # a leaked reservation would refuse the last
    with client_for(limited) as c:
        for prompt in (short + "the ", long):
            with pytest.raises(grpc.RpcError) as err:
                collect(c.generate(prompt, params=params))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-prompt-tokens" in err.value.details()
        assert collect(c.generate("the", params=params))[1].usage.completion_tokens == 30  # both reservations were given back


def test_unknown_model_and_bad_prompt(start_server):
    server = start_server()
    with client_for(server) as client:
        with pytest.raises(grpc.RpcError) as err:
            collect(client.generate("a", model="gpt"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'gpt' is not served" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            collect(client.generate("ZZZ"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'Z'" in err.value.details()
        assert [m.name for m in client.list_models()] == ["char"]
        text = "the rain"  # ids in order, as the model's own tokenizer gives them
        assert client.tokenize(text) == server.models[0].model.tokenizer.encode(text)
        assert client.tokenize(text[::-1]) != client.tokenize(text)


def make_cert(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def test_tls_and_bearer_auth(start_server, tmp_path):
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("openssl is not installed")
    key, cert = make_cert(tmp_path)
    server = start_server(tls_cert=cert, tls_key=key, auth_token="s3cret")
    target = f"localhost:{server.port}"
    with RnngenClient(target, tls_ca=cert, token="s3cret") as client:
        text, last = collect(client.generate("a", params=GenerationParams(max_new_tokens=10, seed=1)))
        assert last.usage.completion_tokens == 10
    for token in (None, "wrong", "s3cret "):
        with RnngenClient(target, tls_ca=cert, token=token) as client:
            with pytest.raises(grpc.RpcError) as err:
                collect(client.generate("a"))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with RnngenClient(target) as plaintext:
        with pytest.raises(grpc.RpcError) as err:
            plaintext.list_models()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(target, creds) as channel:  # health answers without the token
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_metrics_endpoint(start_server):
    server = start_server(metrics_port=0)
    with client_for(server) as client:
        collect(client.generate("a", params=GenerationParams(max_new_tokens=20, seed=1)))
        long = client.generate("a", params=GenerationParams(max_new_tokens=1_000_000, seed=1))
        for _ in range(3):  # a few messages: inter-token gaps are observed
            next(long)
        long.cancel()
        with pytest.raises(grpc.RpcError):
            collect(client.generate("a", params=GenerationParams(max_new_tokens=20), model="nope"))
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'rnngen_requests_total{model="char",status="OK"} 1.0' in body
    assert wait_until(lambda: 'status="CANCELLED"' in urllib.request.urlopen(
        f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode())
    assert 'rnngen_requests_total{model="nope",status="NOT_FOUND"} 1.0' in body
    assert re.search(r'rnngen_generated_tokens_total\{model="char"\} (\d+)', body)
    for name in ("rnngen_active_streams", "rnngen_queued_requests", "rnngen_time_to_first_token_seconds_bucket",
                 "rnngen_inter_token_latency_seconds_bucket"):
        assert name in body



def test_load_and_token_metrics_follow_every_change_per_model():
    """The scheduler reports load and tokens after every step; the gauges are set only when a value
    changed, and each model keeps its own series."""
    from prometheus_client import generate_latest

    from rnngen.serving.metrics import ServerMetrics

    metrics = ServerMetrics()

    def sample(name: str, model: str) -> float:
        match = re.search(rf'{name}\{{model="{model}"\}} (\S+)', generate_latest(metrics.registry).decode())
        return float(match.group(1))

    for active, queued in ((3, 1), (3, 1), (5, 0), (0, 0)):
        metrics.load("a", active, queued)
        assert (sample("rnngen_active_streams", "a"), sample("rnngen_queued_requests", "a")) == (active, queued)
    metrics.load("b", 7, 2)
    metrics.load("a", 0, 0)
    assert sample("rnngen_active_streams", "b") == 7 and sample("rnngen_active_streams", "a") == 0
    for n in (4, 5):
        metrics.tokens("a", n)
    metrics.tokens("b", 1)
    assert sample("rnngen_generated_tokens_total", "a") == 9 and sample("rnngen_generated_tokens_total", "b") == 1

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def test_soak_many_requests_some_cancelled(start_server):
    server = start_server(max_active=32, max_queued=64)
    scheduler = server.models[0].scheduler
    total, workers = 600, 12
    counter = iter(range(total))
    lock = threading.Lock()
    outcomes = {"done": 0, "cancelled": 0, "errors": 0}

    def worker():
        with client_for(server) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                stream = client.generate("the ", params=GenerationParams(max_new_tokens=30, seed=i))
                try:
                    if i % 5 == 0:  # a fifth cancelled mid-stream
                        next(stream)
                        stream.cancel()
                        key = "cancelled"
                    else:
                        assert list(stream)[-1].usage.completion_tokens == 30
                        key = "done"
                except grpc.RpcError:
                    key = "errors"
                with lock:
                    outcomes[key] += 1

    warm = threading.Thread(target=worker)
    counter_warm, counter = counter, iter(range(60))
    warm.start()
    warm.join(60)
    counter = counter_warm
    before = rss_mb()
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outcomes["errors"] == 0
    assert outcomes["cancelled"] >= 100 and outcomes["done"] >= 400
    assert wait_until(lambda: scheduler.active == 0 and scheduler.queued == 0)
    assert rss_mb() - before < 100, (before, rss_mb())


def test_reflection_lists_the_services(start_server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    server = start_server()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"rnngen.v1.Generator", "grpc.health.v1.Health"} <= services
        method = db.FindFileContainingSymbol("rnngen.v1.Generator")
        assert method.package == "rnngen.v1"


def test_introspection_details_stream_with_the_text(start_server, char_model_file):
    params = GenerationParams(max_new_tokens=40, seed=8, introspect=True, top_alternatives=3, units=("l1.c[2]", "l0.h[0]"),
                              processors=("ban:e",))
    local = generate(RnnModel.load(char_model_file, device="cpu"), "the ", params).sequences[0]
    server = start_server()
    with client_for(server) as client:
        messages = list(client.generate("the ", params=params))
    details = [d for m in messages for d in m.details]
    assert "".join(m.text for m in messages) == local.text and "e" not in local.text
    assert len(details) == 40 == len(local.details)
    for remote, mine in zip(details, local.details):
        assert remote.token_id == mine["token_id"] and remote.text == mine["text"]
        assert remote.logprob == pytest.approx(mine["logprob"], abs=1e-4)
        assert [a.token_id for a in remote.top] == [a["token_id"] for a in mine["top"]]
        assert dict(remote.units) == pytest.approx(mine["units"], abs=1e-4)
    with client_for(server) as client:
        for bad, needle in ((GenerationParams(introspect=True, units=("l9.h[0]",)), "layer 9 is not in 0..1"),
                            (GenerationParams(introspect=True, units=("l0.f[0]",)), "kind 'f' is not one of h, c"),
                            (GenerationParams(processors=("ban:QQ",)), "none of 'QQ'")):
            with pytest.raises(grpc.RpcError) as info:
                collect(client.generate("a", params=bad))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in info.value.details()


def test_a_failing_processor_ends_its_own_stream_only(start_server):
    server = start_server()
    with client_for(server) as client:
        long = client.generate("a", params=GenerationParams(max_new_tokens=400, seed=3))
        first = next(long)
        # Each processor is valid alone; together they leave no token, found only while decoding.
        with pytest.raises(grpc.RpcError) as info:
            collect(client.generate("a", params=GenerationParams(processors=("only:xyz", "ban:xyz"))))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "processor ban:xyz: no token is left to choose" in info.value.details()
        rest = list(long)
    assert rest[-1].usage.completion_tokens == 400 and len(first.text + "".join(m.text for m in rest)) == 400


# -- delivery --------------------------------------------------------------------------------------


def test_the_default_message_rate_is_250_per_core_at_most_1000(monkeypatch, char_model_file):
    """Messages cost the event loop and the clients CPU that decoding needs: by default a server sends
    250 a second per core it may use (500 on 2 cores), at most 1000; a rate given is kept."""
    from rnngen.serving.delivery import default_message_rate

    assert [default_message_rate(n) for n in (1, 2, 3, 4, 64)] == [250.0, 500.0, 750.0, 1000.0, 1000.0]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert ServerConfig(models=[char_model_file]).message_rate == 500.0
    assert ServerConfig(models=[char_model_file], message_rate=2000.0).message_rate == 2000.0


def test_a_fast_stream_arrives_in_coalesced_messages_with_the_same_text(start_server, char_model_file):
    server = start_server(message_rate=20.0)  # a lone stream is flushed every 50 ms
    params = GenerationParams(max_new_tokens=3000, seed=5)
    with client_for(server) as client:
        messages = list(client.generate("the ", params=params, return_token_ids=True))
    assert sum(len(m.token_ids) for m in messages) == 3000
    assert len(messages) < 3000 / 10  # many tokens per message (one per token without coalescing)
    assert "".join(m.text for m in messages) == generate(RnnModel.load(char_model_file, device="cpu"), "the ", params).text


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_concurrent_streams_token_ids_and_text_add_up_message_by_message(kind, start_server, char_model_file,
                                                                           byte_model_file):
    """Text is made when it is collected (every interval), not at each step: every stream's token ids add
    up to its tokens, each message's text is what its ids decode to (a byte model's split
    characters carried to the next message), and the text is the text decoded alone."""
    path = char_model_file if kind == "char" else byte_model_file
    server = start_server(models=path, message_rate=2000.0)
    local = RnnModel.load(path, device="cpu")
    # Long enough to outlast several intervals (4 ms at 8 streams) however fast the steps are here.
    jobs = [GenerationParams(max_new_tokens=2000 + 37 * s, seed=s, temperature=1.3) for s in range(8)]
    results = [None] * len(jobs)

    def run(i):
        with client_for(server) as client:
            results[i] = list(client.generate("to be é" if kind == "byte" else "to be ", params=jobs[i],
                                              return_token_ids=True))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for params, messages in zip(jobs, results):
        ids = [t for m in messages for t in m.token_ids]
        assert len(ids) == params.max_new_tokens == messages[-1].usage.completion_tokens
        assert len(messages) > 2  # coalesced, and more than a first and a last message
        decoder = local.tokenizer.stream_decoder()
        for m in messages:
            assert m.text == "".join(decoder.push(t) for t in m.token_ids) + (decoder.flush() if m.finish_reason else "")
        prompt = "to be é" if kind == "byte" else "to be "
        assert "".join(m.text for m in messages) == generate(local, prompt, params).text


def test_between_collections_a_streams_text_is_not_made_step_by_step(start_server):
    """With a collection every 2 s, a lone stream's tokens are decoded by the steps but its text
    waits for the next one: made once per collection for every row, not once per step."""
    server = start_server(message_rate=0.5)
    engine = server.models[0].scheduler._engines[0]
    with client_for(server) as client:
        collect(client.generate("a", params=GenerationParams(max_new_tokens=5)))  # a collection now: the next in 2 s
        stream = client.generate("the ", params=GenerationParams(max_new_tokens=100_000, seed=2))
        first = next(stream)  # its first token, sent at once
        assert len(first.text) == 1
        assert wait_until(lambda: engine._count(0) > 200, timeout=10)
        assert engine._a["decoded"][0] <= 1  # 200 steps, no text made since the first token
        stream.cancel()


def test_a_stream_left_alone_after_a_burst_gets_its_messages_at_its_own_pace(start_server):
    """The delivery interval is open streams / message_rate, taken at each step: once a burst of
    streams has ended, the one left hears again within its own interval (1 s at one message a
    second), not the burst's (20 streams: 20 s from the burst's last collection)."""
    server = start_server(message_rate=1.0)
    with client_for(server) as client:
        lone = client.generate("the ", params=GenerationParams(max_new_tokens=10_000_000, seed=1))
        next(lone)
        started = time.monotonic()
        burst = [client.generate("a", params=GenerationParams(max_new_tokens=10_000_000, seed=i)) for i in range(19)]
        ends: list = []
        drains = [threading.Thread(target=drain_until_cancelled, args=(stream, ends)) for stream in burst]
        for t in drains:
            t.start()
        time.sleep(2.0)  # the burst outlasts a collection made while it is open (the lone stream's is due within 1 s)
        for stream in burst:
            stream.cancel()
        for t in drains:
            t.join(60)
        ended = time.monotonic()
        assert ends == [grpc.StatusCode.CANCELLED] * len(burst)
        next(lone)  # whatever was collected before the burst ended
        next(lone)
        waited = time.monotonic() - ended
        lone.cancel()
    assert waited < 5.0  # about 1 s; 20 s with the burst's interval


def test_a_streams_first_text_and_its_end_do_not_wait_for_the_flush_timer(start_server, char_model_file):
    """With one flush every 2 s, a short stream still gets its first text and its last message at
    once; the tokens between them wait for the timer and come coalesced."""
    server = start_server(message_rate=0.5)  # a lone stream is flushed every 2 s
    params = GenerationParams(max_new_tokens=200, seed=5)
    with client_for(server) as client:
        collect(client.generate("the ", params=params))  # the server's first flush is due at once anyway
        started = time.monotonic()
        messages = list(client.generate("the ", params=params, return_token_ids=True))
        took = time.monotonic() - started
    assert took < 1.0  # waiting for the timer would take about 2 s
    assert 1 <= len(messages[0].token_ids) < 200 and messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert "".join(m.text for m in messages) == generate(RnnModel.load(char_model_file, device="cpu"), "the ", params).text


def test_waiting_streams_join_in_one_batched_admission(start_server):
    server = start_server()
    served = server.models[0]
    scheduler, engine = served.scheduler, served.scheduler._engines[0]
    added = []
    real_add = engine.add
    engine.add = lambda rows, logits, state: added.append(len(rows)) or real_add(rows, logits, state)
    params = GenerationParams(max_new_tokens=5, seed=1)
    with scheduler._lock:  # the decoding thread cannot take any of them before all five wait
        for prompt in ("the", "cat", "sat", "on ", "a m"):  # one length: prefilled in the same round
            scheduler.reserve()
            scheduler.enqueue(server.service._prefill(served, pb.GenerateRequest(prompt=prompt), params)[1])
    assert wait_until(lambda: added and scheduler.active == 0 and scheduler.queued == 0)
    assert added == [5]


# -- operations ------------------------------------------------------------------------------------


def test_a_port_in_use_is_refused_in_one_line(start_server, char_model_file, monkeypatch):
    from rnngen.cli import create_app
    from typer.testing import CliRunner

    server = start_server()
    result = CliRunner().invoke(create_app(), ["serve", "-m", str(char_model_file), "--port", str(server.port)])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (f"error: --port {server.port}: cannot listen on 127.0.0.1:"
                                                      f"{server.port} (in use by another process, or not an address of this host)")
    assert "Traceback" not in result.output and "Failed to add port" not in result.stderr
    # Behind that check gRPC itself refuses the port (no SO_REUSEPORT), for a server that binds in the gap.
    monkeypatch.setattr(server_module, "port_is_free", lambda host, port: True)
    with pytest.raises(RnngenError, match=f"--port {server.port}: cannot listen"):
        RnngenServer(ServerConfig(models=[char_model_file], port=server.port))
    with client_for(server) as client:  # the first server still has the port alone
        assert collect(client.generate("a", params=GenerationParams(max_new_tokens=3)))[1].usage.completion_tokens == 3


def test_start_up_errors_name_the_file_or_port(start_server, char_model_file, tmp_path):
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("openssl is not installed")
    from rnngen.cli import create_app
    from typer.testing import CliRunner

    key, cert = make_cert(tmp_path)
    (tmp_path / "other").mkdir()
    other_key, _ = make_cert(tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    busy = start_server(metrics_port=0).metrics_port
    serve = ["serve", "-m", str(char_model_file), "--port", "0"]
    cases = [
        (["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(key)], f"--tls-cert {tmp_path / 'nope.pem'}: No such file"),
        (["--tls-cert", str(garbage), "--tls-key", str(key)], f"--tls-cert {garbage}: not a PEM certificate"),
        (["--tls-cert", str(cert), "--tls-key", str(garbage)], f"--tls-key {garbage}: not a PEM private key"),
        (["--tls-cert", str(cert), "--tls-key", str(other_key)], f"--tls-key {other_key}: does not match the certificate"),
        (["--session-secret-file", str(tmp_path / "secret")], f"--session-secret-file {tmp_path / 'secret'}: No such file"),
        (["--metrics-port", str(busy)], f"--metrics-port {busy}: cannot listen on 127.0.0.1:{busy} (in use"),
    ]
    for extra, needle in cases:
        result = CliRunner().invoke(create_app(), serve + extra)
        assert result.exit_code == 1, (extra, result.output)
        errors = [line for line in result.stderr.strip().splitlines() if "session secret" not in line]
        assert len(errors) == 1 and errors[0].startswith("error: ") and needle in errors[0], (extra, result.stderr)


def test_undecodable_requests_are_invalid_argument(start_server):
    server = start_server()
    bad_utf8 = b"\x12\x02\xff\xfe"  # field 2 (prompt) holding bytes that are not UTF-8
    truncated = b"\x12\x09ab"  # field 2 says 9 bytes, 2 follow
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method, response in (("Generate", pb.GenerateResponse), ("Tokenize", pb.TokenizeResponse)):
            call = (channel.unary_stream if method == "Generate" else channel.unary_unary)(
                f"/rnngen.v1.Generator/{method}", response_deserializer=response.FromString)
            for raw in (bad_utf8, truncated):
                with pytest.raises(grpc.RpcError) as err:
                    reply = call(raw, timeout=5)
                    list(reply) if method == "Generate" else reply
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, raw)
                assert f"not a valid rnngen.v1.{method}Request" in err.value.details()


def requests_counted(server):
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    return {status: float(n) for status, n in re.findall(r'rnngen_requests_total\{model="char",status="(\w+)"\} (\S+)', body)}


def test_a_cancel_after_the_last_token_counts_as_ok_and_one_before_as_cancelled(start_server):
    server = start_server(metrics_port=0)
    with client_for(server) as client:
        for i in range(8):
            stream = client.generate("a", params=GenerationParams(max_new_tokens=10, seed=i))
            while not next(stream).finish_reason:
                pass
            stream.cancel()  # the last message is in: the stream was complete
        long = client.generate("a", params=GenerationParams(max_new_tokens=1_000_000, seed=1))
        next(long)
        long.cancel()
    assert wait_until(lambda: requests_counted(server) == {"OK": 8.0, "CANCELLED": 1.0}), requests_counted(server)


def test_every_status_the_server_returns_is_documented():
    from rnngen.serving.protocol import STATUS_OF

    table = (Path(__file__).resolve().parent.parent / "docs" / "serving.md").read_text().split("## Status codes")[1]
    rows = [line.split("|")[1] for line in table.split("\n## ")[0].splitlines() if line.startswith("| ")]
    documented = {code.strip() for row in rows for code in row.split(",")}
    returned = {code.name for _, code in STATUS_OF} | {"OK", "UNAUTHENTICATED", "DEADLINE_EXCEEDED", "CANCELLED",
                                                      "INTERNAL", "UNIMPLEMENTED", "UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    assert returned <= documented, returned - documented


def test_generate_server_goes_on_to_the_next_address(start_server, char_model_file):
    from rnngen.cli import create_app
    from typer.testing import CliRunner

    server = start_server()
    with socket_on_a_closed_port() as dead:
        result = CliRunner().invoke(create_app(), ["generate", "--server", f"127.0.0.1:{dead},127.0.0.1:{server.port}",
                                                   "-p", "the ", "-n", "30", "--seed", "3", "-q"])
    assert result.exit_code == 0, result.output
    local = generate(RnnModel.load(char_model_file, device="cpu"), "the ", GenerationParams(max_new_tokens=30, seed=3))
    assert result.stdout == "the " + local.text + "\n"


@contextlib.contextmanager
def socket_on_a_closed_port():
    """A port nobody listens on (bound, never listening, so no other test takes it meanwhile)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]
