"""`rnngen serve` and `rnngen health`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from rnngen.cli.console import EXIT_ERROR, stderr
from rnngen.model.locations import MODEL_DIRS_ENV


def serve(
    model: Optional[List[Path]] = typer.Option(None, "--model", "-m", help="A model to serve (repeatable); its name is the file's stem."),
    model_dir: Optional[List[str]] = typer.Option(None, "--model-dir", envvar=MODEL_DIRS_ENV, help="Serve every .onnx file in this folder (repeatable, or several joined with ':' as in PATH; missing folders are skipped)."),
    host: str = typer.Option("127.0.0.1", "--host", envvar="RNNGEN_HOST", help="Address to listen on."),
    port: int = typer.Option(50051, "--port", envvar="RNNGEN_PORT", help="gRPC port (0: any free port)."),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", envvar="RNNGEN_METRICS_PORT", help="Prometheus /metrics port (off unless given)."),
    max_active: int = typer.Option(256, "--max-active", envvar="RNNGEN_MAX_ACTIVE", help="Streams decoding at once, per model."),
    max_queued: int = typer.Option(512, "--max-queued", envvar="RNNGEN_MAX_QUEUED", help="Accepted streams waiting for a row, per model."),
    device: str = typer.Option("auto", "--device", envvar="RNNGEN_DEVICE", help="auto, cpu or cuda."),
    session_secret_file: Optional[str] = typer.Option(None, "--session-secret-file", help="File with the secret that signs session tokens (or set RNNGEN_SESSION_SECRET); replicas that share it can resume each other's sessions."),
    session_ttl: float = typer.Option(86400.0, "--session-ttl", help="Seconds a session token stays valid."),
    auth_token: Optional[str] = typer.Option(None, "--auth-token", envvar="RNNGEN_AUTH_TOKEN", help="Require this bearer token."),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", envvar="RNNGEN_TLS_CERT", help="TLS certificate (PEM)."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", envvar="RNNGEN_TLS_KEY", help="TLS private key (PEM)."),
    grace: float = typer.Option(30.0, "--grace", help="On SIGTERM: seconds for in-flight streams to finish; then each gets a last message with its session token (given a session secret) to continue on another server."),
    threads: int = typer.Option(0, "--threads", envvar="RNNGEN_THREADS", help="onnxruntime threads per model (0: one per core)."),
    max_prompt_tokens: int = typer.Option(1_000_000, "--max-prompt-tokens", envvar="RNNGEN_MAX_PROMPT_TOKENS", help="Refuse prompts longer than this many tokens (prompts prefill in constant memory; this bounds their time)."),
    message_rate: Optional[float] = typer.Option(None, "--message-rate", envvar="RNNGEN_MESSAGE_RATE", show_default="250 per CPU core, at most 1000", help="Messages per second, all streams together: each stream's text goes out every (open streams / this) seconds, coalesced (lower: more CPU for decoding; higher: smaller gaps)."),
    prefill_chunk: int = typer.Option(256, "--prefill-chunk", envvar="RNNGEN_PREFILL_CHUNK", help="At most this many prompt tokens per prompt between two decoding steps (fewer when that would take over 4 ms)."),
    prefix_cache_mb: float = typer.Option(64.0, "--prefix-cache-mb", envvar="RNNGEN_PREFIX_CACHE_MB", help="Memory per model for states after prompt prefixes seen before (0: no prefix cache)."),
    per_stream: bool = typer.Option(False, "--per-stream", help="Decode each stream on its own (a benchmark baseline, not for production)."),
) -> None:
    from rnngen.errors import InvalidParameterError
    from rnngen.model.locations import models_in, split_dirs
    from rnngen.plugins import processor_factories, tokenizer_kinds
    from rnngen.serving.server import ServerConfig, load_secret, serve_forever

    models = list(model or []) + models_in(split_dirs(model_dir or []))
    if not models:
        raise InvalidParameterError("model: nothing to serve; give --model FILE or --model-dir with .onnx files")
    secret = load_secret(session_secret_file)
    if secret is None:
        stderr().print("[yellow]no session secret given: session tokens are valid on this process only[/]")
    config = ServerConfig(models=models, host=host, port=port, metrics_port=metrics_port,
                          max_active=max_active, max_queued=max_queued, device=device, session_secret=secret,
                          session_ttl_s=session_ttl, auth_token=auth_token, tls_cert=tls_cert, tls_key=tls_key,
                          grace_s=grace, threads=threads, per_stream=per_stream, max_prompt_tokens=max_prompt_tokens,
                          message_rate=message_rate, prefill_chunk=prefill_chunk, prefix_cache_mb=prefix_cache_mb,
                          tokenizers=tokenizer_kinds(), processors=processor_factories())
    serve_forever(config, announce=lambda line: print(line, flush=True))


def health(
    server: Optional[str] = typer.Option(None, "--server", show_default="127.0.0.1:$RNNGEN_PORT, or :50051", help="HOST:PORT."),
    service: str = typer.Option("", "--service", help="Service to ask about ('' is the whole server)."),
    timeout: float = typer.Option(3.0, "--timeout", help="Seconds to wait for the answer."),
    tls_ca: Optional[Path] = typer.Option(None, "--tls-ca", help="CA certificate of a TLS server."),
) -> None:
    """Exit 0 when the server's gRPC health service says SERVING, else 1 (for container health checks)."""
    import os

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = server or f"127.0.0.1:{os.environ.get('RNNGEN_PORT', '50051')}"
    if tls_ca is not None:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes()))
    else:
        channel = grpc.insecure_channel(target)
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        stderr().print(f"[bold red]error:[/] {target}: {exc.code().name}: {escape(str(exc.details()))}")
        raise typer.Exit(EXIT_ERROR) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    typer.echo(f"{target}: {status}")
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(EXIT_ERROR)
