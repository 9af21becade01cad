"""The rnngen.v1.Generator service on grpc.aio, over one scheduler per model.

Requests are mapped in rnngen.serving.protocol; each stream's prompt is
prefilled off the event loop, then its row joins the model's scheduler, whose
per-step updates come back to the loop in one call and go out as messages.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from rnngen.decoding.engine import DecodeEngine, resume
from rnngen.decoding.rows import Row, resolve_seed, row_generator
from rnngen.decoding.params import DEFAULT_MAX_PROMPT_TOKENS, GenerationParams, check_prompt_length
from rnngen.decoding.processors import ProcessorFactories, build_processors
from rnngen.errors import ModelNotFoundError, RnngenError
from rnngen.model.runtime import RnnModel
from rnngen.model.units import state_units
from rnngen.serving.metrics import ServerMetrics
from rnngen.serving.protocol import FINISH_TO_PB, details_to_pb, error_details, params_from_pb, status_of
from rnngen.serving.scheduler import END, Scheduler, Stream
from rnngen.serving.sessions import SessionCodec, model_identity
from rnngen.v1 import rnngen_pb2 as pb
from rnngen.v1 import rnngen_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generator"].full_name


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
                 prefill_threads: int = 4, processors: ProcessorFactories | None = None,
                 max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS):
        self.models: dict[str, ServedModel] = {}  # filled by serve_models() once their schedulers exist
        self.default = ""
        self.sessions = sessions
        self.metrics = metrics
        self.loop = loop
        # Prompts are prefilled off the event loop (onnxruntime releases the GIL while it runs).
        self.prefill_pool = futures.ThreadPoolExecutor(max_workers=prefill_threads, thread_name_prefix="rnngen-prefill")
        self.processors = processors  # processor names requests may use (None: the built-ins)
        self.max_prompt_tokens = max_prompt_tokens
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
            await context.abort(status_of(exc), error_details(exc))

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
            processors = build_processors(params.processors, served.model.tokenizer, self.processors)
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
            await context.abort(status_of(exc), error_details(exc))
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
            row, logits, state = resume(model, saved, params, keep_text=False)
            prompt_tokens = 0
        else:
            ids = tokenizer.encode(request.prompt, on_unknown=params.on_unknown)
            check_prompt_length(len(ids), self.max_prompt_tokens)
            prompt_ids = ids if ids else tokenizer.start_ids()
            logits, state = DecodeEngine(model).prefill(prompt_ids)
            row = Row.start(params, row_generator(resolve_seed(params.seed), 0), tokenizer, prompt_ids,
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
        return self.sessions.encode(served.model_id, row.snapshot(), served.model.state_names)


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
