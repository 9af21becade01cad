"""`rnngen serve`: the gRPC server (rnngen.v1.Generator) over one scheduler per model.

Protobuf stays at this boundary: requests become `GenerationParams` (validated
once, here) and the engine's updates become `GenerateResponse` messages. Errors
map to gRPC status codes in one place (`STATUS_OF`). Health (grpc.health.v1)
and reflection are served beside it; Prometheus metrics on their own HTTP port.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rnngen.engine import FINISH_LENGTH, FINISH_STOP, BatchState, DecodeEngine, Row, resolve_seed, row_generator
from rnngen.errors import InvalidParameterError, RnngenError, TokenizerError
from rnngen.introspection import state_units
from rnngen.metrics import ServerMetrics
from rnngen.runtime import RnnModel, SessionOptions
from rnngen.sampling import GenerationParams
from rnngen.scheduler import END, OverloadedError, Scheduler, ShuttingDownError, Stream
from rnngen.sessions import (
    HISTORY_TAIL, SessionCodec, SessionExpiredError, SessionState, SessionTokenError, model_identity, rng_from_state,
)
from rnngen.v1 import rnngen_pb2 as pb
from rnngen.v1 import rnngen_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generator"].full_name


class ModelNotFoundError(RnngenError):
    """No served model has the requested name (NOT_FOUND)."""


# The one place where rnngen errors become gRPC status codes (most specific first).
STATUS_OF: list[tuple[type, grpc.StatusCode]] = [
    (SessionExpiredError, grpc.StatusCode.FAILED_PRECONDITION),
    (SessionTokenError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidParameterError, grpc.StatusCode.INVALID_ARGUMENT),
    (TokenizerError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShuttingDownError, grpc.StatusCode.UNAVAILABLE),
]


def status_of(exc: Exception) -> grpc.StatusCode:
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


FINISH_TO_PB = {FINISH_LENGTH: pb.FINISH_REASON_LENGTH, FINISH_STOP: pb.FINISH_REASON_STOP}

_OPTIONAL_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "no_repeat_ngram_size", "seed")


def params_from_pb(message: pb.GenerationParameters) -> GenerationParams:
    """Validated generation parameters from a request; unset fields keep the CLI's defaults."""
    kwargs = {name: getattr(message, name) for name in _OPTIONAL_FIELDS if message.HasField(name)}
    if message.stop:
        kwargs["stop"] = tuple(message.stop)
    if message.on_unknown:
        kwargs["on_unknown"] = message.on_unknown
    if message.processors:
        kwargs["processors"] = tuple(message.processors)
    if message.introspect:
        kwargs["introspect"] = True
        kwargs["units"] = tuple(message.units)
        if message.HasField("top_alternatives"):
            kwargs["top_alternatives"] = message.top_alternatives
    elif message.units:
        kwargs["units"] = tuple(message.units)  # refused by GenerationParams with the reason
    return GenerationParams(**kwargs)


def details_to_pb(details: dict) -> pb.TokenDetail:
    return pb.TokenDetail(token_id=details["token_id"], text=details["text"], logprob=details["logprob"],
                          entropy=details["entropy"], units=details.get("units", {}),
                          top=[pb.Alternative(token_id=a["token_id"], text=a["text"], prob=a["prob"]) for a in details["top"]])


@dataclass
class ServedModel:
    name: str
    model: RnnModel
    scheduler: Scheduler
    model_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.model_id = model_identity(self.model.file.model_bytes)

    def to_pb(self) -> pb.ModelInfo:
        c, t = self.model.config, self.model.file.training
        info = pb.ModelInfo(name=self.name, cell=c.cell, num_layers=c.num_layers, hidden_size=c.hidden_size,
                            tokenizer=self.model.tokenizer.kind, vocab_size=c.vocab_size, device=self.model.device)
        if isinstance(t.get("val_loss"), (int, float)):
            info.val_loss = t["val_loss"]
        return info


class GeneratorService(pb_grpc.GeneratorServicer):
    """The rnngen.v1.Generator service on grpc.aio: one event loop serves every stream's I/O."""

    def __init__(self, sessions: SessionCodec, metrics: ServerMetrics, loop: asyncio.AbstractEventLoop,
                 prefill_threads: int = 4):
        self.models: dict[str, ServedModel] = {}  # filled by serve_models() once their schedulers exist
        self.default = ""
        self.sessions = sessions
        self.metrics = metrics
        self.loop = loop
        # Prompts are prefilled off the event loop (onnxruntime releases the GIL while it runs).
        self.prefill_pool = futures.ThreadPoolExecutor(max_workers=prefill_threads, thread_name_prefix="rnngen-prefill")
        self.in_flight = 0  # Generate calls not yet returned (a drain waits for them); touched on the loop only

    def serve_models(self, models: list[ServedModel]) -> None:
        self.models = {m.name: m for m in models}
        self.default = models[0].name

    def sink(self, delivery) -> None:
        """Called by a scheduler thread once per step: hand the step's updates to the loop in one call."""
        self.loop.call_soon_threadsafe(self._dispatch, delivery)

    @staticmethod
    def _dispatch(delivery) -> None:
        for stream, item in delivery:
            stream.inbox.append(item)
            stream.ready.set()

    def _served(self, name: str) -> ServedModel:
        served = self.models.get(name or self.default)
        if served is None:
            raise ModelNotFoundError(f"model: {name!r} is not served here; served: {', '.join(self.models)}")
        return served

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[m.to_pb() for m in self.models.values()])

    async def Tokenize(self, request, context):
        try:
            served = self._served(request.model)
            return pb.TokenizeResponse(token_ids=served.model.tokenizer.encode(request.text))
        except RnngenError as exc:
            await context.abort(status_of(exc), str(exc))

    async def Generate(self, request, context):
        start = time.perf_counter()
        name = request.model or self.default
        status = "CANCELLED"  # unless the stream ends normally or with an error below
        recorded = False
        stream = None
        self.in_flight += 1
        try:
            served = self._served(request.model)
            params = params_from_pb(request.params)
            params.check_for_vocab(served.model.config.vocab_size)
            # Built here so that a bad argument or unit fails the request, not the decode loop.
            processors = params.build_processors(served.model.tokenizer)
            units = state_units(params.units, served.model.config)
            served.scheduler.reserve()
            try:
                stream, logits, state = await self.loop.run_in_executor(
                    self.prefill_pool, self._prefill, served, request, params)
            except BaseException:
                served.scheduler.release()
                raise
            stream.row.logit_processors, stream.row.units = processors, units
            stream.ready = asyncio.Event()
            served.scheduler.enqueue(stream, logits, state)
            async for message in self._responses(served, stream, request, start):
                yield message
            status = "OK"
        except RnngenError as exc:
            status, recorded = status_of(exc).name, True
            self.metrics.requests.labels(name, status).inc()  # counted before the client can see the error
            await context.abort(status_of(exc), str(exc))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # a bug in one stream ends that stream only
            status, recorded = "INTERNAL", True
            self.metrics.requests.labels(name, status).inc()
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            if stream is not None:
                stream.cancel()  # a client's cancel or deadline frees the row at the next step
            if not recorded:
                self.metrics.requests.labels(name, status).inc()
            self.in_flight -= 1

    def _prefill(self, served: ServedModel, request, params: GenerationParams):
        model = served.model
        tokenizer = model.tokenizer
        if request.WhichOneof("start") == "session":
            saved = self.sessions.decode(request.session, served.model_id, model.state_names)
            logits, state = model.step(np.array([saved.pending_token], dtype=np.int64), saved.state)
            decoder = tokenizer.stream_decoder()
            decoder.restore(saved.decoder_pending)
            row = Row(params, rng_from_state(saved.rng_state), decoder, list(saved.history_tail),
                      generated_before=saved.generated_before, keep_text=False)
            prompt_tokens = 0
            state = BatchState(state)
        else:
            ids = tokenizer.encode(request.prompt, on_unknown=params.on_unknown)
            prompt_ids = ids if ids else tokenizer.start_ids()
            logits, state = DecodeEngine(model).prefill(prompt_ids)
            row = Row(params, row_generator(resolve_seed(params.seed), 0), tokenizer.stream_decoder(), list(prompt_ids),
                      keep_text=False)  # the text is streamed, not kept: a stream's memory stays constant
            prompt_tokens = len(ids)
        row.capture_state = request.return_session
        stream = Stream(row, prompt_tokens)
        row.tag = stream
        return stream, logits, state

    async def _responses(self, served: ServedModel, stream: Stream, request, start: float):
        name = served.name
        last = None
        while True:
            await stream.ready.wait()
            stream.ready.clear()
            items, stream.inbox = stream.inbox, []
            for item in items:
                if isinstance(item, Exception):
                    raise item
            updates = [item for item in items if item is not END]
            ended = items[-1] is END
            if updates:
                now = time.perf_counter()
                if last is None:
                    self.metrics.ttft.labels(name).observe(now - start)
                else:
                    self.metrics.itl.labels(name).observe(now - last)
                last = now
                message = self._message(served, stream, request, updates)
                if message is not None:
                    yield message
            if ended:
                return

    def _message(self, served: ServedModel, stream: Stream, request, updates) -> pb.GenerateResponse | None:
        """One message for everything decoded since the last: per token for a reader that keeps up."""
        text = "".join(u.text for u in updates)
        final = updates[-1] if updates[-1].finished else None
        if not (text or final or request.return_token_ids or request.params.introspect):
            return None  # a byte model's unfinished character: nothing to show yet
        message = pb.GenerateResponse(text=text)
        if request.return_token_ids:
            message.token_ids.extend(u.token for u in updates)
        if request.params.introspect:
            message.details.extend(details_to_pb(u.details) for u in updates if u.details is not None)
        if final is not None:
            row = final.row
            message.finish_reason = FINISH_TO_PB[row.finish_reason]
            message.usage.prompt_tokens = stream.prompt_tokens
            message.usage.completion_tokens = row.count
            if request.return_session:
                message.session = self._session_token(served, row)
        return message

    def _session_token(self, served: ServedModel, row: Row) -> bytes:
        saved = SessionState(served.model_id, row.final_state, row.last_token, row.rng.bit_generator.state,
                             row.decoder.save(), list(row.history)[-HISTORY_TAIL:], row.generated_before + row.count)
        return self.sessions.encode(saved, served.model.state_names)


class BearerAuth(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` (constant-time comparison); health and reflection stay open."""

    OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(self.OPEN_PREFIXES):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return await continuation(details)
        return self._deny_stream if details.method.endswith("/Generate") else self._deny_unary


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

    def __post_init__(self) -> None:
        for name, value, lo in (("max_active", self.max_active, 1), ("max_queued", self.max_queued, 0),
                                ("port", self.port, 0)):
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
            loaded.append((name, RnnModel.load(path, device=config.device, options=SessionOptions(config.threads))))
        secret = config.session_secret or secrets.token_bytes(32)
        self.service = GeneratorService(SessionCodec(secret, config.session_ttl_s), self.metrics, self.loop)
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

