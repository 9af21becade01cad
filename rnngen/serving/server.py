"""`rnngen serve`: configuration and lifecycle of the gRPC server.

One scheduler thread per model decodes; the gRPC server and its event loop run
in a thread of their own. Health (grpc.health.v1) and reflection are served
beside the Generator service; Prometheus metrics on their own HTTP port.

Every start-up problem (a file that cannot be read, a PEM that does not parse,
a key that does not match its certificate, a port in use) is one RnngenError
naming the option and the file or port, raised before anything is served.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rnngen.checks import check_int, check_number
from rnngen.decoding.params import DEFAULT_MAX_PROMPT_TOKENS
from rnngen.decoding.processors import ProcessorFactories
from rnngen.errors import InvalidParameterError, RnngenError
from rnngen.model.devices import SessionOptions
from rnngen.model.runtime import RnnModel
from rnngen.model.tokenizers import TokenizerKinds
from rnngen.serving.delivery import Outbox, default_message_rate
from rnngen.serving.metrics import ServerMetrics
from rnngen.serving.prefill import DEFAULT_CACHE_MB, DEFAULT_CHUNK, Prefiller, PrefixCache
from rnngen.serving.scheduler import Scheduler
from rnngen.serving.service import SERVICE_NAME, BearerAuth, GeneratorService, RefuseUndecodable, ServedModel
from rnngen.serving.sessions import DEFAULT_TTL_S, SessionCodec
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
    session_ttl_s: float = DEFAULT_TTL_S
    auth_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    grace_s: float = 30.0  # SIGTERM: time for in-flight streams to finish
    threads: int = 0  # onnxruntime intra-op threads per model; 0 lets onnxruntime choose
    per_stream: bool = False  # benchmark baseline: no batching across streams
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS  # longer prompts are refused (INVALID_ARGUMENT)
    # Messages per second, all streams together: a stream's text is flushed every open_streams / message_rate
    # seconds (lower: fewer, larger messages and more CPU for decoding; higher: smaller gaps between messages).
    # None: rnngen.serving.delivery.default_message_rate() (250 per CPU core, at most 1000).
    message_rate: float | None = None
    prefill_chunk: int = DEFAULT_CHUNK  # prompt tokens per prompt between two decoding steps
    prefix_cache_mb: float = DEFAULT_CACHE_MB  # per model: states after prompt prefixes (0: no cache)
    # Plugins are consulted at the edge (the CLI) and their tables handed down: None means the built-ins.
    tokenizers: TokenizerKinds | None = None  # tokenizer kinds models may use
    processors: ProcessorFactories | None = None  # processor names requests may use

    def __post_init__(self) -> None:
        # Worded as every other range check (rnngen.checks), so the CLI names its own options.
        for name, lo, hi in (("max_active", 1, 10**7), ("max_queued", 0, 10**9), ("port", 0, 65535),
                             ("max_prompt_tokens", 1, 10**12), ("prefill_chunk", 1, 10**9)):
            check_int(name, getattr(self, name), lo, hi)
        if self.message_rate is None:
            self.message_rate = default_message_rate()
        check_number("message_rate", self.message_rate, 0, 1e9, lo_open=True)
        check_number("prefix_cache_mb", self.prefix_cache_mb, 0, 1e9)  # 0 turns the cache off
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
        self.models: list[ServedModel] = []
        self._drain_lock = threading.Lock()
        try:
            self._build()
        except BaseException:
            self._close()
            raise

    def _build(self) -> None:
        config = self.config
        # Files and ports first: a start-up problem is reported before any model loads.
        self._tls = tls_key_and_cert(config.tls_key, config.tls_cert) if config.tls_cert else None
        if config.metrics_port is not None:
            self._metrics_http = listen_http(self.metrics, config.host, config.metrics_port)
            self.metrics_port = self._metrics_http.server_port
        names = set()
        loaded = []
        for path in config.models:
            name = Path(path).stem
            if name in names:
                raise InvalidParameterError(f"model: two models are named {name!r}; rename one file")
            names.add(name)
            # The decoding threads' onnxruntime threads stop spinning after each step: the event loop
            # needs the cores between steps (see SessionOptions.spin_between_runs).
            options = SessionOptions(config.threads, spin_between_runs=False)
            loaded.append((name, RnnModel.load(path, device=config.device, options=options, tokenizers=config.tokenizers)))
        secret = config.session_secret or secrets.token_bytes(32)
        self.outbox = Outbox(self.loop, config.message_rate)
        self.service = GeneratorService(SessionCodec(secret, config.session_ttl_s), self.metrics, self.outbox,
                                       processors=config.processors, resumable=config.session_secret is not None,
                                       max_prompt_tokens=config.max_prompt_tokens)
        self.models = [ServedModel(name, model, Scheduler(model, name, self.outbox, config.max_active,
                                                          config.max_queued, config.per_stream, self.metrics,
                                                          self._prefiller(name, model)))
                       for name, model in loaded]
        self.service.serve_models(self.models)
        self.port = self._run(self._start_grpc())

    def _prefiller(self, name: str, model: RnnModel) -> Prefiller:
        budget = int(self.config.prefix_cache_mb * 2**20)
        return Prefiller(model, PrefixCache(budget) if budget else None, self.config.prefill_chunk, metrics=self.metrics,
                         name=name)

    def _run(self, coro, timeout: float | None = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start_grpc(self) -> int:
        config = self.config
        interceptors = [BearerAuth(config.auth_token)] if config.auth_token else []
        interceptors.append(RefuseUndecodable())
        # No SO_REUSEPORT: a second server on a port in use must fail, not share the connections.
        self.grpc_server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_GeneratorServicer_to_server(self.service, self.grpc_server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server)
        address = f"{config.host}:{config.port}"
        port_error = RnngenError(f"--port {config.port}: cannot listen on {address} (in use by another process, "
                                 "or not an address of this host)")
        if not port_is_free(config.host, config.port):
            raise port_error  # asked before gRPC, which would also log its own lines about it
        try:
            if self._tls:
                port = self.grpc_server.add_secure_port(address, grpc.ssl_server_credentials([self._tls]))
            else:
                port = self.grpc_server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind"
            port = 0
        if port == 0:
            raise port_error
        return port

    def start(self) -> "RnngenServer":
        async def go():
            await self.grpc_server.start()
            for status_name in ("", SERVICE_NAME):
                await self.health.set(status_name, health_pb2.HealthCheckResponse.SERVING)
        self._run(go())
        return self

    def drain(self, grace_s: float | None = None) -> None:
        """Stop accepting (health NOT_SERVING, new calls UNAVAILABLE), let in-flight streams finish, stop.

        Streams still running when the grace period ends get one last message after their next token:
        with a shared session secret it carries a session token that continues the stream on another
        server (FINISH_REASON_INTERRUPTED), without one the stream ends UNAVAILABLE. The decoding
        threads end before gRPC and onnxruntime are torn down.
        """
        with self._drain_lock:
            if self._stopped.is_set():
                return
            grace = self.config.grace_s if grace_s is None else grace_s
            # Refuse new streams before health says NOT_SERVING: a client that sees NOT_SERVING and
            # calls at once must be refused, not accepted in the gap between the two.
            for m in self.models:
                m.scheduler.stop_accepting()
            self._run(self.health.enter_graceful_shutdown())
            self._wait_for_streams(grace)
            if self.service.in_flight:
                for m in self.models:
                    m.scheduler.interrupt(resumable=self.service.resumable)
                self._wait_for_streams(LAST_MESSAGES_S)
            # Handlers are done, but their last messages may still be on the way out: stop() with a
            # grace lets those calls complete (it returns as soon as they have) before cancelling any.
            self._run(self.grpc_server.stop(1.0), timeout=None)
            self._close()
            self._stopped.set()

    def _wait_for_streams(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.service.in_flight:
            time.sleep(0.01)

    def _close(self) -> None:
        """Decoding and prefill threads end first (none may be inside onnxruntime at exit), then the loop."""
        for m in self.models:
            m.scheduler.close()
        service = getattr(self, "service", None)
        if service is not None:
            service.prefill_pool.shutdown(wait=True, cancel_futures=True)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join(10)

    def shutdown(self) -> None:
        self.drain(0)

    def wait(self) -> None:
        self._stopped.wait()


LAST_MESSAGES_S = 10.0  # after the grace period: time for interrupted streams to get their last message out


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
        return read_file("--session-secret-file", path).strip()
    env = os.environ.get("RNNGEN_SESSION_SECRET")
    return env.encode() if env else None



def read_file(option: str, path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidParameterError(f"{option} {path}: {exc.strerror or exc}") from None


def tls_key_and_cert(key_path: Path, cert_path: Path) -> tuple[bytes, bytes]:
    """The PEM key and certificate, checked to parse and to belong together (gRPC would only say "failed to bind")."""
    key, cert = read_file("--tls-key", key_path), read_file("--tls-cert", cert_path)
    try:
        ssl.create_default_context(cadata=cert.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError):
        raise InvalidParameterError(f"--tls-cert {cert_path}: not a PEM certificate") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path, password=lambda: b"")  # never a prompt for a passphrase
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise InvalidParameterError(f"--tls-key {key_path}: does not match the certificate in {cert_path}") from None
        raise InvalidParameterError(f"--tls-key {key_path}: not a PEM private key (unencrypted)") from None
    return key, cert


def listen_http(metrics: ServerMetrics, host: str, port: int):
    try:
        server, _ = metrics.serve_http(port, host)
    except OSError as exc:
        in_use = exc.errno == errno.EADDRINUSE
        raise InvalidParameterError(f"--metrics-port {port}: cannot listen on {host}:{port} "
                                    f"({'in use by another process' if in_use else exc.strerror or exc})") from None
    return server


def port_is_free(host: str, port: int) -> bool:
    """False if another process listens on host:port (port 0 is always free)."""
    if port == 0:
        return True
    try:
        addresses = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return True  # not resolvable: gRPC reports it
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no obstacle
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return False
    return True
