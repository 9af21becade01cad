"""`rnngen generate`: locally from a model file, or on a server with --server."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from rnngen.cli.console import stderr

def generate(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="An rnngen .onnx model (with --server: a served model's name)."),
    prompt: str = typer.Option("", "--prompt", "-p", help="Text to start from (empty: the model starts a new text)."),
    prompt_file: Optional[str] = typer.Option(None, "--prompt-file", help="Read the prompt from this UTF-8 file ('-': standard input); it is not echoed."),
    max_prompt_tokens: int = typer.Option(1_000_000, "--max-prompt-tokens", help="Refuse prompts longer than this many tokens (local; a server has its own limit)."),
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
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: per sequence text, tokens, finish reason, logprob (and beam_score for beams)."),
    introspect: bool = typer.Option(False, "--introspect", help="With --json: per token the top alternatives, entropy and --unit activations."),
    top_alternatives: int = typer.Option(5, "--top-alternatives", help="With --introspect: alternatives listed per token."),
    unit: Optional[List[str]] = typer.Option(None, "--unit", help="With --introspect: report this state unit per token, e.g. l1.c[42] (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the text, no statistics."),
    server: Optional[str] = typer.Option(None, "--server", help="Generate on an rnngen server at HOST:PORT instead of locally; several joined with ',' (or a DNS name with several servers): a stream cut by a stopping server continues on the next."),
    tls_ca: Optional[Path] = typer.Option(None, "--tls-ca", help="With --server: CA certificate of a TLS server."),
    token: Optional[str] = typer.Option(None, "--token", envvar="RNNGEN_AUTH_TOKEN", help="With --server: bearer token."),
    session_out: Optional[Path] = typer.Option(None, "--session-out", help="With --server: save a session token here to resume later."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="With --server: continue the session saved in this file."),
) -> None:
    params_of = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, no_repeat_ngram_size=no_repeat_ngram, seed=seed,
        stop=tuple(stop or ()), processors=tuple(processor or ()), on_unknown=unknown, n=samples, num_beams=beams,
        length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=num_return,
        introspect=introspect, top_alternatives=top_alternatives, units=tuple(unit or ()),
    )
    echo = prompt_file is None  # a prompt from a file is not printed again
    prompt = _read_prompt(prompt, prompt_file)
    if server is not None:
        _generate_remote(_params(params_of, as_json), model=model, prompt=prompt, echo=echo, as_json=as_json, quiet=quiet,
                         server=server, tls_ca=tls_ca, token=token, session_out=session_out, resume=resume)
        return
    from rnngen.cli.loading import load_model
    from rnngen.decoding.generation import Generation
    from rnngen.errors import InvalidParameterError
    from rnngen.plugins import processor_factories

    params = _params(params_of, as_json)
    if model is None:
        raise InvalidParameterError("--model: give a model file (or --server HOST:PORT)")
    rnn = load_model(model, device=device)
    gen = Generation(rnn, prompt, params, processor_factories(), max_prompt_tokens)
    several = params.n > 1 or params.num_return_sequences > 1
    out = sys.stdout
    start = time.perf_counter()
    if as_json or several:
        for _ in gen:
            pass
    else:  # one sequence: stream it as it is made
        if echo:
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
            beam = "" if s.beam_score is None else f" · beam score {s.beam_score:.3f}"
            console.rule(f"sequence {s.index + 1} · {s.tokens} tokens · {s.finish_reason} · logprob {s.logprob:.3f}{beam}",
                         style="dim")
            out.write((prompt if echo else "") + s.text + "\n")
    out.flush()
    if not quiet and not as_json:
        tokens = result.new_tokens
        rate = tokens / elapsed if elapsed > 0 else float("inf")
        stderr().print(
            f"[dim]{tokens} tokens in {elapsed:.2f} s ({rate:,.0f} tokens/s) on {rnn.device}, "
            f"finish: {', '.join(s.finish_reason for s in result.sequences)}[/]"
        )


def _read_prompt(prompt: str, prompt_file: str | None) -> str:
    """The prompt from --prompt, or from --prompt-file (a file, or '-' for standard input)."""
    from rnngen.errors import InvalidParameterError

    if prompt_file is None:
        return prompt
    if prompt:
        raise InvalidParameterError("--prompt-file: give either --prompt or --prompt-file, not both")
    try:
        if prompt_file == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        return Path(prompt_file).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidParameterError(f"--prompt-file: {prompt_file} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    except OSError as exc:
        raise InvalidParameterError(f"--prompt-file: cannot read {prompt_file}: {exc.strerror}") from None


def _params(options: dict, as_json: bool):
    """The one GenerationParams of the command's options (local and --server alike)."""
    from rnngen.decoding.params import GenerationParams
    from rnngen.errors import InvalidParameterError

    params = GenerationParams(**options)
    if params.introspect and not as_json:
        raise InvalidParameterError("--introspect: the per-token details come with --json")
    return params


def _generate_remote(params, *, model, prompt, echo, as_json, quiet, server, tls_ca, token, session_out, resume) -> None:
    import grpc

    from rnngen.errors import InvalidParameterError, RnngenError
    from rnngen.serving.client import RnngenClient

    if params.n != 1 or params.num_beams != 1 or params.num_return_sequences != 1:
        raise InvalidParameterError("--samples, --beams and --num-return are for local generation; the server streams one sample")
    session = resume.read_bytes() if resume else None
    if session_out is not None:  # checked before generating: the session exists only once the text has streamed
        from rnngen.checks import check_output_file

        check_output_file(session_out, force=True)
    out = sys.stdout
    text, last, details = "", None, []
    start = time.perf_counter()
    try:
        with RnngenClient(server, tls_ca=tls_ca, token=token) as client:
            if echo and not as_json and session is None:
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
        if params.introspect:
            from rnngen.serving.protocol import details_from_pb

            sequence["details"] = [details_from_pb(d) for d in details]
        out.write(json.dumps({"server": server, "model": model or "", "sequences": [sequence]},
                             ensure_ascii=False, indent=2) + "\n")
    else:
        out.write("\n")
    out.flush()
    if not quiet and not as_json and last is not None:
        tokens = last.usage.completion_tokens
        stderr().print(f"[dim]{tokens} tokens in {elapsed:.2f} s from {server}, finish: {reason}[/]")
