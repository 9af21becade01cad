"""The rnngen.v1.Generator service on grpc.aio, over one scheduler per model.

Requests are mapped in rnngen.serving.protocol; each stream's prompt is
prefilled off the event loop, then its row joins the model's scheduler, which
hands its text to the Outbox (each delivery interval, and at once for a
stream's first token and its end) to go out as coalesced messages
(rnngen.serving.delivery).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from rnngen.decoding.engine import FINISH_INTERRUPTED, resume
from rnngen.decoding.params import DEFAULT_MAX_PROMPT_TOKENS, GenerationParams, check_prompt_length
from rnngen.decoding.rows import Row, resolve_seed, row_generator
from rnngen.decoding.processors import ProcessorFactories, build_processors
from rnngen.errors import ModelNotFoundError, RnngenError
from rnngen.model.runtime import RnnModel
from rnngen.model.units import state_units
from rnngen.serving.delivery import Outbox, Pending, Stream
from rnngen.serving.metrics import ServerMetrics
from rnngen.serving.prefill import PrefillJob
from rnngen.serving.protocol import FINISH_TO_PB, details_to_pb, error_details, params_from_pb, status_of
from rnngen.serving.scheduler import Scheduler
from rnngen.serving.sessions import SessionCodec, model_identity
from rnngen.v1 import rnngen_pb2 as pb
from rnngen.v1 import rnngen_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generator"].full_name
# Prompts up to this many characters are set up (tokenized, their row made) on the event loop: for
# them a hop to the prefill threads and back costs more than the work. Longer prompts and sessions
# (whose pending token is fed through the model) go to the prefill threads.
INLINE_PROMPT_CHARS = 4096


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

    def __init__(self, sessions: SessionCodec, metrics: ServerMetrics, outbox: Outbox,
                 prefill_threads: int = 4, processors: ProcessorFactories | None = None, resumable: bool = False,
                 max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS):
        self.models: dict[str, ServedModel] = {}  # filled by serve_models() once their schedulers exist
        self.default = ""
        self.sessions = sessions
        self.metrics = metrics
        self.outbox = outbox
        self.loop = outbox.loop
        # resumable: session tokens are valid on other replicas (a shared secret), so a stream cut by a
        # stopping server ends with a token to continue elsewhere.
        self.resumable = resumable
        # Requests are tokenized and session tokens checked off the event loop; schedulers run the model.
        self.prefill_pool = futures.ThreadPoolExecutor(max_workers=prefill_threads, thread_name_prefix="rnngen-prefill")
        self.processors = processors  # processor names requests may use (None: the built-ins)
        self.max_prompt_tokens = max_prompt_tokens
        self.in_flight = 0  # Generate calls not yet returned (a drain waits for them); touched on the loop only

    def serve_models(self, models: list[ServedModel]) -> None:
        self.models = {m.name: m for m in models}
        self.default = models[0].name

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
        allowed = context.time_remaining()  # None: the client set no deadline
        name = request.model or self.default
        status = "CANCELLED"  # until the last message is written (a later cancel changes nothing), or an error
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
                if request.WhichOneof("start") != "session" and len(request.prompt) <= INLINE_PROMPT_CHARS:
                    stream, job = self._prefill(served, request, params)
                else:
                    stream, job = await self.loop.run_in_executor(self.prefill_pool, self._prefill, served, request, params)
            except BaseException:
                served.scheduler.release()
                raise
            stream.row.logit_processors, stream.row.units = processors, units
            stream.want_tokens = request.return_token_ids
            stream.wake = asyncio.Event()
            self.outbox.open_streams += 1
            served.scheduler.enqueue(job)
            async for message in self._responses(served, stream, request, start):
                yield message
                if message.finish_reason:
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
                self.outbox.open_streams -= 1
                if status == "CANCELLED":
                    served.scheduler.cancel(stream)  # a client's cancel or deadline frees the row at the next step
            if not recorded:
                if status == "CANCELLED" and allowed is not None and time.perf_counter() - start >= allowed:
                    status = "DEADLINE_EXCEEDED"
                self.metrics.requests.labels(name, status).inc()
            self.in_flight -= 1

    def _prefill(self, served: ServedModel, request, params: GenerationParams) -> tuple[Stream, PrefillJob]:
        """The stream's row and what its scheduler feeds the model before it joins (prompt, or a session's pending token)."""
        model = served.model
        tokenizer = model.tokenizer
        if request.WhichOneof("start") == "session":
            saved = self.sessions.decode(request.session, served.model_id, model.state_names)
            # The pending token is fed here, as the uninterrupted run would have fed it (the same
            # random draw): the row joins already prefilled.
            row, logits, state = resume(model, saved, params, keep_text=False)
            job = PrefillJob([], state.arrays, logits=logits)
            prompt_tokens = 0
        else:
            ids = tokenizer.encode(request.prompt, on_unknown=params.on_unknown)
            check_prompt_length(len(ids), self.max_prompt_tokens)
            prompt_ids = ids if ids else tokenizer.start_ids()
            job = PrefillJob(list(prompt_ids))  # from the zero state: the prefix cache applies
            row = Row.start(params, row_generator(resolve_seed(params.seed), 0), tokenizer, prompt_ids,
                            keep_text=False)  # the text is streamed, not kept: a stream's memory stays constant
            prompt_tokens = len(ids)
        row.capture_state = request.return_session
        stream = Stream(row, prompt_tokens)
        row.tag = job.tag = stream
        return stream, job

    async def _responses(self, served: ServedModel, stream: Stream, request, start: float):
        """The stream's messages: each carries what accumulated since the last (see rnngen.serving.delivery)."""
        name = served.name
        last = None
        while True:
            await stream.wake.wait()
            stream.wake.clear()
            pending = self.outbox.take(stream)
            if pending.error is not None:
                raise pending.error
            if pending.count:
                now = time.perf_counter()
                if last is None:
                    self.metrics.ttft.labels(name).observe(now - start)
                else:
                    self.metrics.itl.labels(name).observe(now - last)
                last = now
                message = self._message(served, stream, request, pending)
                if message is not None:
                    yield message
            if pending.ended:
                return

    def _message(self, served: ServedModel, stream: Stream, request, pending: Pending) -> pb.GenerateResponse | None:
        """One message for everything decoded since the last."""
        text = "".join(pending.texts)
        introspect = stream.row.params.introspect
        if not (text or pending.ended or stream.want_tokens or introspect):
            return None  # a byte model's unfinished character: nothing to show yet
        message = pb.GenerateResponse(text=text)
        if stream.want_tokens:
            message.token_ids.extend(pending.tokens)
        if introspect:
            message.details.extend(details_to_pb(d) for d in pending.details)
        if pending.ended:
            row = stream.row
            message.finish_reason = FINISH_TO_PB[row.finish_reason]
            message.usage.prompt_tokens = stream.prompt_tokens
            message.usage.completion_tokens = row.count
            if row.finish_reason == FINISH_INTERRUPTED:
                self.metrics.interrupted.labels(served.name).inc()
            if request.return_session or row.finish_reason == FINISH_INTERRUPTED:
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


class Undecodable:
    """Stands for a request that did not parse; the method answers INVALID_ARGUMENT instead of running."""

    def __init__(self, message_type: str):
        self.reason = f"request: not a valid {message_type} (invalid UTF-8 in a string field, or a corrupt message)"


class RefuseUndecodable(grpc.aio.ServerInterceptor):
    """Requests to the Generator service that cannot be decoded get INVALID_ARGUMENT (gRPC itself says UNKNOWN)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE_NAME}/") or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer
        message_type = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
        message_type = message_type.full_name if message_type is not None else "request"

        def parse(data: bytes):
            try:
                return deserialize(data)
            except Exception:  # protobuf's DecodeError, or anything a corrupt message raises
                return Undecodable(message_type)

        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                async for message in inner_stream(request, context):
                    yield message

            return handler._replace(request_deserializer=parse, unary_stream=unary_stream)
        inner_unary = handler.unary_unary

        async def unary_unary(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            return await inner_unary(request, context)

        return handler._replace(request_deserializer=parse, unary_unary=unary_unary)
