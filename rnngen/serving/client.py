"""A small Python client for `rnngen serve`.

    with RnngenClient("127.0.0.1:50051") as client:
        for message in client.generate("ROMEO:", params=GenerationParams(seed=1)):
            print(message.text, end="", flush=True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import grpc

from rnngen.decoding.params import GenerationParams
from rnngen.serving.protocol import params_to_pb
from rnngen.v1 import rnngen_pb2 as pb
from rnngen.v1 import rnngen_pb2_grpc as pb_grpc

class RnngenClient:
    def __init__(self, target: str, tls_ca: str | Path | None = None, token: str | None = None, tls: bool = False):
        if tls_ca is not None or tls:
            root = Path(tls_ca).read_bytes() if tls_ca is not None else None
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root))
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.GeneratorStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def generate(self, prompt: str = "", model: str = "", params: GenerationParams | None = None,
                 session: bytes | None = None, return_session: bool = False, return_token_ids: bool = False,
                 timeout: float | None = None) -> Iterator[pb.GenerateResponse]:
        """Stream of GenerateResponse; the last one has finish_reason, usage and (if asked) the session token."""
        request = pb.GenerateRequest(model=model, params=params_to_pb(params or GenerationParams()),
                                     return_session=return_session, return_token_ids=return_token_ids)
        if session is not None:
            request.session = session
        else:
            request.prompt = prompt
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata).models)

    def tokenize(self, text: str, model: str = "") -> list[int]:
        return list(self.stub.Tokenize(pb.TokenizeRequest(model=model, text=text), metadata=self.metadata).token_ids)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RnngenClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
