"""The `rnngen` command line. Built by `create_app()`; heavy modules load inside commands.

`generate`, `info` and `score` never import torch; `train` and `export` do.
Errors the user can cause print as one line on stderr with exit code 1.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from rnngen import __version__
from rnngen.errors import RnngenError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """One clear line and a non-zero exit for errors the user can act on."""
    try:
        yield
    except RnngenError as exc:
        _stderr().print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, soft_wrap=True)
        raise typer.Exit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        _stderr().print("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"rnngen {__version__}")
        raise typer.Exit()


def create_app() -> typer.Typer:
    """The CLI: rnngen's own commands and those of plugins, added through the same hook."""
    app = typer.Typer(
        name="rnngen",
        help="Train, export and run recurrent language models (RNN, LSTM, GRU) with ONNX.",
        no_args_is_help=True,
        add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
        pretty_exceptions_enable=False,
    )

    @app.callback()
    def root(
        ctx: typer.Context,
        config: Optional[Path] = typer.Option(None, "--config", envvar="RNNGEN_CONFIG", help="TOML file of option defaults, one table per command (default: $XDG_CONFIG_HOME/rnngen/config.toml where it exists)."),
        version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ) -> None:
        from rnngen.settings import config_defaults

        # Every command option can come from RNNGEN_<COMMAND>_<OPTION> (an option that names its own
        # variable, such as serve's RNNGEN_PORT, uses that one) and from the config file.
        # Precedence: command line > environment > config file > built-in default (docs/configuration.md).
        ctx.auto_envvar_prefix = "RNNGEN"
        with user_errors():
            ctx.default_map = config_defaults(config, ctx.command)

    from rnngen.plugins import registry

    registry().add_commands(app)
    return app


def main() -> None:
    create_app()()


# ---------------------------------------------------------------------------- train


def train(
    data: Path = typer.Argument(..., help="UTF-8 text file to train on."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory for checkpoints and the loss curve [default: runs/CELL]."),
    cell: str = typer.Option("lstm", help="Recurrent cell: rnn, lstm or gru."),
    layers: int = typer.Option(2, help="Number of stacked recurrent layers."),
    hidden: int = typer.Option(512, help="Hidden units per layer."),
    embedding: int = typer.Option(0, help="Embedding size; 0 means equal to --hidden."),
    tokenizer: str = typer.Option("char", help="Tokenizer: char, byte or word."),
    max_vocab: int = typer.Option(10_000, help="Word tokenizer: keep this many most frequent words."),
    seq_len: int = typer.Option(128, help="Truncated BPTT length in tokens."),
    batch_size: int = typer.Option(32, help="Parallel streams per step."),
    lr: float = typer.Option(2e-3, help="Peak learning rate (AdamW)."),
    warmup: int = typer.Option(100, help="Linear warm-up steps."),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay on weight matrices."),
    dropout: float = typer.Option(0.2, help="Dropout on embedding, between layers and before the decoder."),
    grad_clip: float = typer.Option(1.0, help="Clip the gradient norm to this (0 disables)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps [default: 5000]."),
    epochs: Optional[float] = typer.Option(None, help="Train this many passes over the data instead of --steps."),
    val_fraction: Optional[float] = typer.Option(None, help="Share of the corpus, from its end, held out for validation (word models: cut at a line start) [default: 0.1]."),
    val_file: Optional[Path] = typer.Option(None, "--val-file", help="Validate on this UTF-8 text instead of holding out part of DATA."),
    eval_every: str = typer.Option("250", help="Steps between validation, samples and checkpoints, or 'epoch'."),
    sample_tokens: int = typer.Option(200, help="Length of the sample shown at each evaluation (0: none, no cost)."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write loss.png at each evaluation (--no-plot: never load matplotlib)."),
    seed: int = typer.Option(1337, help="Random seed (weights, dropout, samples)."),
    threads: int = typer.Option(0, help="CPU threads for torch (0: torch's default)."),
    tie: Optional[bool] = typer.Option(None, "--tie/--no-tie", help="Share the embedding with the decoder (needs --embedding 0 or equal to --hidden) [default: tie when the sizes are equal]."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA where torch sees a GPU), cpu or cuda; under torchrun each process uses GPU LOCAL_RANK."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 (TF32 matrix math on GPUs that have it) or bf16 autocast; fp32 measured faster for LSTMs on an H100 [default: fp32; on --resume the run's]."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this directory from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start over in a non-empty run directory (replaces its checkpoints)."),
) -> None:
    options = dict(locals())
    with user_errors():
        from rnngen.training.progress import run_training

        run_training(**options)


# ---------------------------------------------------------------------------- export


def export(
    checkpoint: Path = typer.Argument(..., help="Run directory (uses best, else last) or a checkpoint .json file."),
    output: Path = typer.Option(..., "--output", "-o", help="The .onnx file to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
) -> None:
    with user_errors():
        from rnngen.training.export import export_checkpoint

        report = export_checkpoint(checkpoint, output, force=force)
        shapes = ", ".join(f"{b}x{t}" for b, t in report.shapes)
        console = Console(highlight=False)
        console.print("onnx.checker: passed")
        console.print(
            f"parity onnxruntime vs PyTorch (batch x time {shapes}): "
            f"max |diff| logits {report.max_logit_diff:.2e}, state {report.max_state_diff:.2e}"
        )
        console.print(f"wrote {report.path} ({report.bytes / 1e6:.2f} MB, {report.parameters:,} parameters)")


# ---------------------------------------------------------------------------- generate


def generate(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="An rnngen .onnx model (with --server: a served model's name)."),
    prompt: str = typer.Option("", "--prompt", "-p", help="Text to start from (empty: the model starts a new text)."),
    max_new_tokens: int = typer.Option(500, "--max-new-tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens only (0: all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sample from the smallest set reaching this probability (1: all)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below this fraction of the top token's probability."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages tokens already in the text."),
    presence_penalty: float = typer.Option(0.0, "--presence-penalty", help="Subtracted from logits of tokens generated so far."),
    frequency_penalty: float = typer.Option(0.0, "--frequency-penalty", help="Subtracted per earlier occurrence of a token."),
    no_repeat_ngram: int = typer.Option(0, "--no-repeat-ngram", help="Never repeat an n-gram of this size (0: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed: the same seed gives the same text."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop before this string (repeatable)."),
    processor: Optional[List[str]] = typer.Option(None, "--processor", help="A logits processor NAME[:ARGUMENT], e.g. ban:0123456789 (repeatable; `rnngen plugins` lists them)."),
    samples: int = typer.Option(1, "--samples", help="Independent samples of the prompt, decoded as one batch."),
    beams: int = typer.Option(1, "--beams", help="Beam search with this many beams (deterministic)."),
    length_penalty: float = typer.Option(1.0, "--length-penalty", help="Beam score = log-probability / length ** this."),
    early_stopping: bool = typer.Option(False, "--early-stopping", help="End beam search once --beams hypotheses finished."),
    num_return: int = typer.Option(1, "--num-return", help="Beam search: how many best sequences to return."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    unknown: str = typer.Option("error", "--unknown", help="Prompt characters outside the vocabulary: error, replace or skip."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: per sequence text, tokens, finish reason, score."),
    introspect: bool = typer.Option(False, "--introspect", help="With --json: per token the top alternatives, entropy and --unit activations."),
    top_alternatives: int = typer.Option(5, "--top-alternatives", help="With --introspect: alternatives listed per token."),
    unit: Optional[List[str]] = typer.Option(None, "--unit", help="With --introspect: report this state unit per token, e.g. l1.c[42] (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the text, no statistics."),
    server: Optional[str] = typer.Option(None, "--server", help="Generate on an rnngen server at HOST:PORT instead of locally."),
    tls_ca: Optional[Path] = typer.Option(None, "--tls-ca", help="With --server: CA certificate of a TLS server."),
    token: Optional[str] = typer.Option(None, "--token", envvar="RNNGEN_AUTH_TOKEN", help="With --server: bearer token."),
    session_out: Optional[Path] = typer.Option(None, "--session-out", help="With --server: save a session token here to resume later."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="With --server: continue the session saved in this file."),
) -> None:
    if server is not None:
        options = dict(locals())
        with user_errors():
            _generate_remote(**options)
        return
    with user_errors():
        from rnngen.generation import Generation
        from rnngen.runtime import RnnModel
        from rnngen.sampling import GenerationParams

        params = GenerationParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, no_repeat_ngram_size=no_repeat_ngram, seed=seed,
            stop=tuple(stop or ()), processors=tuple(processor or ()), on_unknown=unknown, n=samples, num_beams=beams, length_penalty=length_penalty,
            early_stopping=early_stopping, num_return_sequences=num_return,
            introspect=introspect, top_alternatives=top_alternatives, units=tuple(unit or ()),
        )
        if introspect and not as_json:
            from rnngen.errors import InvalidParameterError

            raise InvalidParameterError("--introspect: the per-token details come with --json")
        if model is None:
            from rnngen.errors import InvalidParameterError

            raise InvalidParameterError("--model: give a model file (or --server HOST:PORT)")
        rnn = RnnModel.load(model, device=device)
        gen = Generation(rnn, prompt, params)
        several = params.n > 1 or params.num_return_sequences > 1
        out = sys.stdout
        start = time.perf_counter()
        if as_json or several:
            for _ in gen:
                pass
        else:  # one sequence: stream it as it is made
            out.write(prompt)
            out.flush()
            for chunk in gen:
                out.write(chunk.text)
                out.flush()
            out.write("\n")
        elapsed = time.perf_counter() - start
        result = gen.result
        if as_json:
            payload = {"model": str(model), "prompt": prompt, "prompt_tokens": result.prompt_tokens, "seed": gen.seed,
                       "sequences": [s.to_dict() for s in result.sequences]}
            out.write(json.dumps(payload, ensure_ascii=False, indent=2) + "\n")
        elif several:
            console = Console(highlight=False)
            for s in result.sequences:
                console.rule(f"sequence {s.index + 1} · {s.tokens} tokens · {s.finish_reason} · score {s.score:.3f}", style="dim")
                out.write(prompt + s.text + "\n")
        out.flush()
        if not quiet and not as_json:
            tokens = result.new_tokens
            rate = tokens / elapsed if elapsed > 0 else float("inf")
            _stderr().print(
                f"[dim]{tokens} tokens in {elapsed:.2f} s ({rate:,.0f} tokens/s) on {rnn.device}, "
                f"finish: {', '.join(s.finish_reason for s in result.sequences)}[/]"
            )


def _generate_remote(*, model, prompt, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                     presence_penalty, frequency_penalty, no_repeat_ngram, seed, stop, processor, samples, beams, length_penalty,
                     early_stopping, num_return, device, unknown, as_json, introspect, top_alternatives, unit, quiet, server,
                     tls_ca, token, session_out, resume) -> None:
    import grpc

    from rnngen.client import RnngenClient
    from rnngen.errors import InvalidParameterError, RnngenError
    from rnngen.sampling import GenerationParams

    if samples != 1 or beams != 1 or num_return != 1:
        raise InvalidParameterError("--samples, --beams and --num-return are for local generation; the server streams one sample")
    params = GenerationParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
        no_repeat_ngram_size=no_repeat_ngram, seed=seed, stop=tuple(stop or ()), processors=tuple(processor or ()),
        on_unknown=unknown, introspect=introspect, top_alternatives=top_alternatives, units=tuple(unit or ()),
    )
    if introspect and not as_json:
        raise InvalidParameterError("--introspect: the per-token details come with --json")
    session = resume.read_bytes() if resume else None
    out = sys.stdout
    text, last, details = "", None, []
    start = time.perf_counter()
    try:
        with RnngenClient(server, tls_ca=tls_ca, token=token) as client:
            if not as_json and session is None:
                out.write(prompt)
            for message in client.generate(prompt, model=model or "", params=params, session=session,
                                           return_session=session_out is not None):
                text += message.text
                last = message
                details.extend(message.details)
                if not as_json:
                    out.write(message.text)
                    out.flush()
    except grpc.RpcError as exc:
        raise RnngenError(f"server {server}: {exc.code().name}: {exc.details()}") from None
    elapsed = time.perf_counter() - start
    reason = {1: "length", 2: "stop"}.get(last.finish_reason, "unknown") if last else "unknown"
    if session_out is not None and last is not None and last.session:
        session_out.write_bytes(last.session)
    if as_json:
        sequence = {"index": 0, "text": text, "tokens": last.usage.completion_tokens if last else 0,
                    "finish_reason": reason}
        if introspect:
            from google.protobuf.json_format import MessageToDict

            sequence["details"] = [MessageToDict(d, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                                   for d in details]
        out.write(json.dumps({"server": server, "model": model or "", "sequences": [sequence]},
                             ensure_ascii=False, indent=2) + "\n")
    else:
        out.write("\n")
    out.flush()
    if not quiet and not as_json and last is not None:
        tokens = last.usage.completion_tokens
        _stderr().print(f"[dim]{tokens} tokens in {elapsed:.2f} s from {server}, finish: {reason}[/]")


# ---------------------------------------------------------------------------- serve


def serve(
    model: Optional[List[Path]] = typer.Option(None, "--model", "-m", help="A model to serve (repeatable); its name is the file's stem."),
    model_dir: Optional[List[str]] = typer.Option(None, "--model-dir", envvar="RNNGEN_MODEL_DIRS", help="Serve every .onnx file in this folder (repeatable, or several joined with ':' as in PATH; missing folders are skipped)."),
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
    grace: float = typer.Option(30.0, "--grace", help="On SIGTERM: seconds for in-flight streams to finish."),
    threads: int = typer.Option(0, "--threads", envvar="RNNGEN_THREADS", help="onnxruntime threads per model (0: one per core)."),
    per_stream: bool = typer.Option(False, "--per-stream", help="Decode each stream on its own (a benchmark baseline, not for production)."),
) -> None:
    with user_errors():
        from rnngen.server import ServerConfig, load_secret, serve_forever

        import os

        models = list(model or [])
        for entry in model_dir or []:
            for folder in map(Path, filter(None, entry.split(os.pathsep))):
                if folder.is_dir():
                    models.extend(sorted(folder.glob("*.onnx")))
        if not models:
            from rnngen.errors import InvalidParameterError

            raise InvalidParameterError("model: nothing to serve; give --model FILE or --model-dir with .onnx files")
        secret = load_secret(session_secret_file)
        if secret is None:
            _stderr().print("[yellow]no session secret given: session tokens are valid on this process only[/]")
        config = ServerConfig(models=models, host=host, port=port, metrics_port=metrics_port,
                              max_active=max_active, max_queued=max_queued, device=device, session_secret=secret,
                              session_ttl_s=session_ttl, auth_token=auth_token, tls_cert=tls_cert, tls_key=tls_key,
                              grace_s=grace, threads=threads, per_stream=per_stream)
        serve_forever(config, announce=lambda line: print(line, flush=True))


# ---------------------------------------------------------------------------- health


def health(
    server: Optional[str] = typer.Option(None, "--server", help="HOST:PORT [default: 127.0.0.1:$RNNGEN_PORT, or :50051]."),
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
        _stderr().print(f"[bold red]error:[/] {target}: {exc.code().name}: {escape(str(exc.details()))}")
        raise typer.Exit(EXIT_ERROR) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    typer.echo(f"{target}: {status}")
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(EXIT_ERROR)


# ---------------------------------------------------------------------------- info


def info(
    model: Path = typer.Argument(..., help="An rnngen .onnx model."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    with user_errors():
        from rich.table import Table

        from rnngen.runtime import RnnModel, available_providers

        rnn = RnnModel.load(model, device=device)
        cfg, meta, training = rnn.config, rnn.file.metadata, rnn.file.training
        rows = {
            "file": str(rnn.file.path),
            "size": f"{len(rnn.file.model_bytes) / 1e6:.2f} MB",
            "format version": str(rnn.file.format_version),
            "cell": cfg.cell,
            "layers": str(cfg.num_layers),
            "hidden size": str(cfg.hidden_size),
            "embedding size": str(cfg.input_size),
            "tied weights": str(cfg.tied),
            "state": ", ".join(f"{s} ({cfg.num_layers}, batch, {cfg.hidden_size})" for s in cfg.state_names),
            "tokenizer": f"{rnn.tokenizer.kind}, {rnn.tokenizer.vocab_size} symbols",
            "parameters": f"{training['parameters']:,}" if training.get("parameters") else "unknown",
            "corpus": f"{training.get('corpus')} ({training.get('corpus_chars') or 0:,} chars)" if training.get("corpus") else "unknown",
            "validation loss": (
                f"{training['val_loss']:.4f} nats/token ({training['val_loss'] / math.log(2):.4f} bits)"
                + (f", last {training['val_fraction']:.0%} of the corpus" if training.get("val_fraction") else "")
                if isinstance(training.get("val_loss"), (int, float)) else "unknown"
            ),
            "training steps": str(training.get("steps", "unknown")),
            "rnngen version": meta.get("rnngen.version", "unknown"),
            "created": meta.get("rnngen.created", "unknown"),
            "providers available": ", ".join(available_providers()),
            "providers used": ", ".join(rnn.providers),
        }
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        table = Table(show_header=False, title=f"rnngen model {model.name}")
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows.items():
            table.add_row(key, value)
        Console().print(table)


# ---------------------------------------------------------------------------- score


def score(
    model: Path = typer.Argument(..., help="An rnngen .onnx model."),
    file: Path = typer.Argument(..., help="UTF-8 text file to score."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    unknown: str = typer.Option("error", "--unknown", help="Characters outside the vocabulary: error, replace or skip."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    with user_errors():
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        from rnngen.runtime import RnnModel
        from rnngen.scoring import score_file

        rnn = RnnModel.load(model, device=device)
        columns = (TextColumn("scoring"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
        with Progress(*columns, console=_stderr(), transient=True, disable=as_json) as progress:
            task = progress.add_task("score", total=file.stat().st_size if file.is_file() else None)
            result = score_file(rnn, file, on_unknown=unknown, on_progress=lambda n: progress.update(task, completed=n))
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
            return
        Console(highlight=False).print(
            f"{file}: {result.tokens:,} tokens, {result.chars:,} chars\n"
            f"  {result.nats_per_token:.4f} nats/token  {result.bits_per_token:.4f} bits/token  "
            f"perplexity {result.perplexity:.3f}\n"
            f"  {result.nats_per_char:.4f} nats/char   {result.bits_per_char:.4f} bits/char"
            + ("" if result.unknown_tokens is None else
               f"\n  {result.unknown_tokens:,} tokens outside the vocabulary ({result.unknown_tokens / result.tokens:.2%})")
        )


# ---------------------------------------------------------------------------- inspect


def inspect(
    text_file: Path = typer.Argument(..., help="UTF-8 text to run the model over."),
    model: str = typer.Option(..., "--model", "-m", help="An rnngen model (char- or byte-level)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the HTML report here [default: TEXT_FILE's name + .inspect.html, unless --json]."),
    as_json: bool = typer.Option(False, "--json", help="Print the analysis as JSON (per-token surprise and entropy included)."),
    feature: Optional[List[str]] = typer.Option(None, "--feature", help="Also rank units against NAME=REGEX: 1 inside matches (repeatable)."),
    unit: Optional[List[str]] = typer.Option(None, "--unit", help="Include this unit's activations, e.g. l1.c[42] (repeatable)."),
    top: int = typer.Option(5, "--top", help="Units listed per feature."),
    max_chars: int = typer.Option(20_000, "--max-chars", help="Analyse at most this many characters from the start of the file."),
    show_chars: int = typer.Option(3_000, "--show-chars", help="Characters shown coloured in the report."),
    unknown: str = typer.Option("error", "--unknown", help="Characters outside the vocabulary: error, or replace (features still see the real text)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Replace an existing report file."),
) -> None:
    """Record every unit over a text, find the units that track features of it, and write a report."""
    with user_errors():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from rnngen.errors import InvalidParameterError
        from rnngen.features import parse_feature_option
        from rnngen.introspection import analyse, analysis_to_dict, parse_unit
        from rnngen.report_html import render_report, report_units
        from rnngen.runtime import RnnModel

        for name, value, low in (("--top", top, 1), ("--max-chars", max_chars, 1), ("--show-chars", show_chars, 1)):
            if value < low:
                raise InvalidParameterError(f"{name}: {value} must be at least {low}")
        if not text_file.is_file():
            raise InvalidParameterError(f"{text_file}: no such file")
        try:
            with open(text_file, encoding="utf-8") as f:
                text = f.read(max_chars)
        except UnicodeDecodeError as exc:
            raise InvalidParameterError(f"{text_file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if output is None and not as_json:
            output = text_file.with_name(text_file.name + ".inspect.html")
        if output is not None and output.exists() and not force:
            raise InvalidParameterError(f"{output} exists; use --force to replace it")
        extra = {}
        for option in feature or []:
            name, compute = parse_feature_option(option)
            extra[name] = (compute, f"inside matches of {option.partition('=')[2]!r}", "regex")
        rnn = RnnModel.load(model, device=device)
        units = [parse_unit(u, rnn.config) for u in unit or []]
        columns = (TextColumn("recording"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeRemainingColumn())
        with Progress(*columns, console=_stderr(), transient=True) as progress:
            task = progress.add_task("record", total=len(text))
            analysis = analyse(rnn, text, extra, top=top, on_progress=lambda n: progress.update(task, completed=n),
                               on_unknown=unknown)
        cfg = rnn.config
        if output is not None:
            summary = (f"{cfg.cell} {cfg.num_layers}x{cfg.hidden_size}, {rnn.tokenizer.kind} tokenizer, "
                       f"{len(analysis.recording.units):,} units recorded")
            page = render_report(analysis, Path(str(model)).name, summary,
                                 report_units(analysis, units), show_chars)
            tmp = output.with_name(output.name + ".tmp")
            tmp.write_text(page, encoding="utf-8")
            tmp.replace(output)  # never a half-written report in place of a good one
        if as_json:
            typer.echo(json.dumps(analysis_to_dict(analysis, rnn, units), ensure_ascii=False))
            return
        console = Console(highlight=False)
        for name, u, r in analysis.best(5):
            console.print(f"  {name:<16} {u.name:<12} r = {r:+.3f}")
        console.print(f"mean surprise {analysis.recording.surprise_bits.mean():.3f} bits/token; wrote {output}")


# ---------------------------------------------------------------------------- plugins


def plugins(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the loaded plugins (rnngen's built-ins among them), what each provides, and any that failed."""
    from rich.table import Table

    from rnngen.plugins import registry

    reg = registry()
    reg.load_all()  # the commands were registered when this CLI was built
    found = list(reg.plugins.values())
    if as_json:
        tables = {"tokenizers": reg.tokenizers(), "logits_processors": reg.logits_processors(),
                  "model_sources": reg.model_sources(), "inspect_features": reg.inspect_features()}
        typer.echo(json.dumps({"plugins": [p.to_dict() for p in found], **{
            kind: {name: {"plugin": e.plugin, "help": e.help} for name, e in table.items()}
            for kind, table in tables.items()}}, indent=2))
        return
    table = Table(title="rnngen plugins")
    for column in ("plugin", "from", "status", "provides"):
        table.add_column(column)
    for p in found:
        provides = "\n".join(f"{kind}: {', '.join(names)}" for kind, names in sorted(p.provides.items()))
        status = p.status if not p.errors else f"{p.status}\n" + "\n".join(p.errors)
        table.add_row(p.name, p.source, status, provides or "-")
    Console().print(table)
    help_table = Table(title="processors, tokenizers, model sources and inspect features", show_header=True)
    for column in ("kind", "name", "plugin", "help"):
        help_table.add_column(column)
    for kind, entries in (("processor", reg.logits_processors()), ("tokenizer", reg.tokenizers()),
                          ("model source", reg.model_sources()), ("inspect feature", reg.inspect_features())):
        for name, e in sorted(entries.items()):
            help_table.add_row(kind, name, e.plugin, e.help)
    Console().print(help_table)
