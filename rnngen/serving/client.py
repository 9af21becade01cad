"""A small Python client for `rnngen serve`.

    with RnngenClient("127.0.0.1:50051") as client:
        for message in client.generate("ROMEO:", params=GenerationParams(seed=1)):
            print(message.text, end="", flush=True)

The target may list several servers, comma-separated ("a:50051,b:50051"), or be
a DNS name that resolves to several. A stream cut short by a server that stops
(its last message has FINISH_REASON_INTERRUPTED and a session token) goes on
from that token on the next server, and a call refused with UNAVAILABLE before
its first message is tried on the next: the caller sees one stream with the
same text as an uninterrupted one (sessions are exact for greedy and seeded
sampling), and usage counts the whole stream.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import grpc

from rnngen.decoding.params import GenerationParams
from rnngen.serving.protocol import params_to_pb
from rnngen.v1 import rnngen_pb2 as pb
from rnngen.v1 import rnngen_pb2_grpc as pb_grpc

TRIES_PER_SERVER = 3  # calls refused as UNAVAILABLE (draining, gone) per server before giving up
RETRY_PAUSE_S = 0.2  # grows by this much with every try


class RnngenClient:
    def __init__(self, target: str, tls_ca: str | Path | None = None, token: str | None = None, tls: bool = False):
        self.targets = [t.strip() for t in target.split(",") if t.strip()]
        if not self.targets:
            raise ValueError("target: give HOST:PORT, several joined with ',', or a DNS name")
        if tls_ca is not None or tls:
            root = Path(tls_ca).read_bytes() if tls_ca is not None else None
            self._credentials = grpc.ssl_channel_credentials(root_certificates=root)
        else:
            self._credentials = None
        self._channels: dict[str, grpc.Channel] = {}
        self._current = 0  # index of the server in use
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def _channel(self, target: str) -> grpc.Channel:
        if target not in self._channels:
            # round_robin: a DNS name's next call goes to the next address, not back to a draining server.
            options = [("grpc.lb_policy_name", "round_robin")]
            self._channels[target] = (grpc.secure_channel(target, self._credentials, options) if self._credentials
                                      else grpc.insecure_channel(target, options))
        return self._channels[target]

    @property
    def stub(self) -> pb_grpc.GeneratorStub:
        return pb_grpc.GeneratorStub(self._channel(self.targets[self._current]))

    def next_server(self) -> None:
        self._current = (self._current + 1) % len(self.targets)

    def generate(self, prompt: str = "", model: str = "", params: GenerationParams | None = None,
                 session: bytes | None = None, return_session: bool = False, return_token_ids: bool = False,
                 timeout: float | None = None) -> "GenerateStream":
        """Stream of GenerateResponse; the last one has finish_reason, usage and (if asked) the session token."""
        params = params or GenerationParams()
        request = pb.GenerateRequest(model=model, params=params_to_pb(params),
                                     return_session=return_session, return_token_ids=return_token_ids)
        if session is not None:
            request.session = session
        else:
            request.prompt = prompt
        return GenerateStream(self, request, params, timeout)

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata).models)

    def tokenize(self, text: str, model: str = "") -> list[int]:
        return list(self.stub.Tokenize(pb.TokenizeRequest(model=model, text=text), metadata=self.metadata).token_ids)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def __enter__(self) -> "RnngenClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GenerateStream:
    """The messages of one Generate call, continued across servers (see the module's doc); `cancel()` ends it."""

    def __init__(self, client: RnngenClient, request: pb.GenerateRequest, params: GenerationParams,
                 timeout: float | None):
        self._client = client
        self._request = request
        self._params = params
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._done_tokens = 0  # completion tokens of the servers the stream has left
        self._prompt_tokens: int | None = None
        self._call = self._start(request)
        self._received = False  # the current call has delivered a message (it can no longer be re-sent)

    def _start(self, request: pb.GenerateRequest):
        timeout = None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)
        return self._client.stub.Generate(request, timeout=timeout, metadata=self._client.metadata)

    def __iter__(self) -> "GenerateStream":
        return self

    def __next__(self) -> pb.GenerateResponse:
        tries = 0
        while True:
            try:
                message = next(self._call)
            except grpc.RpcError as exc:
                tries += 1
                if (exc.code() != grpc.StatusCode.UNAVAILABLE or self._received
                        or tries >= TRIES_PER_SERVER * len(self._client.targets)):
                    raise
                time.sleep(RETRY_PAUSE_S * tries)  # refused before anything came: the same request elsewhere
                self._client.next_server()
                self._call = self._start(self._request)
                continue
            self._received = True
            if self._prompt_tokens is None and message.finish_reason:
                self._prompt_tokens = message.usage.prompt_tokens
            if message.finish_reason == pb.FINISH_REASON_INTERRUPTED and message.session:
                self._resume(message)
                if not (message.text or message.token_ids or message.details):
                    continue
                return pb.GenerateResponse(text=message.text, token_ids=message.token_ids, details=message.details)
            if message.finish_reason:
                message.usage.prompt_tokens = self._prompt_tokens
                message.usage.completion_tokens += self._done_tokens
            return message

    def _resume(self, message: pb.GenerateResponse) -> None:
        """Continue from the message's session token on the next server, for the tokens still to come."""
        self._done_tokens += message.usage.completion_tokens
        remaining = dataclasses.replace(self._params, max_new_tokens=self._params.max_new_tokens - self._done_tokens)
        request = pb.GenerateRequest(model=self._request.model, session=message.session, params=params_to_pb(remaining),
                                     return_session=self._request.return_session,
                                     return_token_ids=self._request.return_token_ids)
        self._request = request
        self._client.next_server()
        self._call = self._start(request)
        self._received = False

    def cancel(self) -> bool:
        return self._call.cancel()

    def code(self):
        return self._call.code()
