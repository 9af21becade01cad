"""`rnngen serve`: configuration and lifecycle of the gRPC server.

One scheduler thread per model decodes; the gRPC server and its event loop run
in a thread of their own. Health (grpc.health.v1) and reflection are served
beside the Generator service; Prometheus metrics on their own HTTP port.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rnngen.decoding.params import DEFAULT_MAX_PROMPT_TOKENS
from rnngen.decoding.processors import ProcessorFactories
from rnngen.errors import InvalidParameterError, RnngenError
from rnngen.model.devices import SessionOptions
from rnngen.model.runtime import RnnModel
from rnngen.model.tokenizers import TokenizerKinds
from rnngen.serving.metrics import ServerMetrics
from rnngen.serving.scheduler import Scheduler
from rnngen.serving.service import SERVICE_NAME, BearerAuth, GeneratorService, ServedModel
from rnngen.serving.sessions import SessionCodec
from rnngen.v1 import rnngen_pb2_grpc as pb_grpc


@dataclass
class ServerConfig:
    models: list[Path]
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    metrics_port: int | None = None  # None: no metrics endpoint; 0 picks a free port
    max_active: int = 256  # streams decoding at once, per model
    max_queued: int = 512  # accepted streams waiting for a row, per model
    device: str = "auto"
    session_secret: bytes | None = None  # None: a random secret (sessions valid on this process only)
    session_ttl_s: float = 24 * 3600
    auth_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    grace_s: float = 30.0  # SIGTERM: time for in-flight streams to finish
    threads: int = 0  # onnxruntime intra-op threads per model; 0 lets onnxruntime choose
    per_stream: bool = False  # benchmark baseline: no batching across streams
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS  # longer prompts are refused (INVALID_ARGUMENT)
    # Plugins are consulted at the edge (the CLI) and their tables handed down: None means the built-ins.
    tokenizers: TokenizerKinds | None = None  # tokenizer kinds models may use
    processors: ProcessorFactories | None = None  # processor names requests may use

    def __post_init__(self) -> None:
        for name, value, lo in (("max_active", self.max_active, 1), ("max_queued", self.max_queued, 0),
                                ("port", self.port, 0), ("max_prompt_tokens", self.max_prompt_tokens, 1)):
            if not isinstance(value, int) or value < lo:
                raise InvalidParameterError(f"{name}: {value!r} must be an integer >= {lo}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidParameterError("TLS needs both --tls-cert and --tls-key")
        if not self.models:
            raise InvalidParameterError("model: give at least one --model")


class RnngenServer:
    """A running server: `start()`, then `wait()` (blocks until shutdown) or `drain()` / `shutdown()`.

    The gRPC server and its event loop run in a thread of their own; one scheduler thread per model decodes.
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = ServerMetrics()
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="rnngen-grpc", daemon=True)
        self._loop_thread.start()
        self._stopped = threading.Event()
        self.metrics_port = None
        self._metrics_http = None
        try:
            self._build()
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise

    def _build(self) -> None:
        config = self.config
        names = set()
        loaded = []
        for path in config.models:
            name = Path(path).stem
            if name in names:
                raise InvalidParameterError(f"model: two models are named {name!r}; rename one file")
            names.add(name)
            loaded.append((name, RnnModel.load(path, device=config.device, options=SessionOptions(config.threads),
                                                 tokenizers=config.tokenizers)))
        secret = config.session_secret or secrets.token_bytes(32)
        self.service = GeneratorService(SessionCodec(secret, config.session_ttl_s), self.metrics, self.loop,
                                       processors=config.processors, max_prompt_tokens=config.max_prompt_tokens)
        self.models = [ServedModel(name, model, Scheduler(model, name, self.service.sink, config.max_active,
                                                          config.max_queued, config.per_stream, self.metrics))
                       for name, model in loaded]
        self.service.serve_models(self.models)
        self.port = self._run(self._start_grpc())

    def _run(self, coro, timeout: float | None = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start_grpc(self) -> int:
        config = self.config
        interceptors = [BearerAuth(config.auth_token)] if config.auth_token else []
        self.grpc_server = grpc.aio.server(interceptors=interceptors)
        pb_grpc.add_GeneratorServicer_to_server(self.service, self.grpc_server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server)
        address = f"{config.host}:{config.port}"
        if config.tls_cert:
            creds = grpc.ssl_server_credentials([(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
            port = self.grpc_server.add_secure_port(address, creds)
        else:
            port = self.grpc_server.add_insecure_port(address)
        if port == 0:
            raise RnngenError(f"cannot listen on {address}")
        return port

    def start(self) -> "RnngenServer":
        if self.config.metrics_port is not None:
            self._metrics_http, _ = self.metrics.serve_http(self.config.metrics_port, self.config.host)
            self.metrics_port = self._metrics_http.server_port

        async def go():
            await self.grpc_server.start()
            for status_name in ("", SERVICE_NAME):
                await self.health.set(status_name, health_pb2.HealthCheckResponse.SERVING)
        self._run(go())
        return self

    def drain(self, grace_s: float | None = None) -> None:
        """Stop accepting (health NOT_SERVING, new calls UNAVAILABLE), let in-flight streams finish, stop."""
        if self._stopped.is_set():
            return
        grace = self.config.grace_s if grace_s is None else grace_s
        # Refuse new streams before health says NOT_SERVING: a client that sees NOT_SERVING and
        # calls at once must be refused, not accepted in the gap between the two.
        for m in self.models:
            m.scheduler.stop_accepting()
        self._run(self.health.enter_graceful_shutdown())
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.service.in_flight:
            time.sleep(0.02)
        # Handlers are done, but their last messages may still be on the way out: stop() with a
        # grace lets those calls complete (it returns as soon as they have) before cancelling any.
        self._run(self.grpc_server.stop(max(deadline - time.monotonic(), 1.0)), timeout=None)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        self.service.prefill_pool.shutdown(wait=False)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._stopped.set()

    def shutdown(self) -> None:
        self.drain(0)

    def wait(self) -> None:
        self._stopped.wait()


def serve_forever(config: ServerConfig, announce=print) -> None:
    """Run until SIGTERM or SIGINT, then drain within the grace period and return (exit code 0)."""
    server = RnngenServer(config).start()
    names = ", ".join(f"{m.name} ({m.model.config.cell} {m.model.config.num_layers}x{m.model.config.hidden_size}, "
                      f"{m.model.device})" for m in server.models)
    scheme = "tls" if config.tls_cert else "plaintext"
    announce(f"rnngen serving {names} on {config.host}:{server.port} ({scheme})"
             + (f", metrics on http://{config.host}:{server.metrics_port}/metrics" if server.metrics_port else ""))

    def on_signal(signum, frame):
        announce(f"received {signal.Signals(signum).name}: draining (grace {config.grace_s:g} s)")
        threading.Thread(target=server.drain, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.wait()
    announce("stopped")


def load_secret(path: str | None) -> bytes | None:
    """The session secret from a file, or from RNNGEN_SESSION_SECRET; None when neither is set."""
    if path:
        return Path(path).read_bytes().strip()
    env = os.environ.get("RNNGEN_SESSION_SECRET")
    return env.encode() if env else None

