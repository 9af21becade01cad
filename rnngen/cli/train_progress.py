"""`rnngen train` as the user sees it: configs from CLI options, a live progress display, samples."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rnngen.errors import CheckpointError, DataError, InvalidParameterError
from rnngen.model.config import ModelConfig
from rnngen.model.tokenizers import TokenizerKinds
from rnngen.training import distributed
from rnngen.training.checkpoint import load_checkpoint
from rnngen.training.trainer import EVAL_EVERY_EPOCH, SYMBOL_TOKENIZERS, EvalReport, StepReport, TrainConfig, Trainer

LOG_LINES_PER_EVAL = 5  # without a terminal (a log file), a plain line this often per evaluation interval
ETA_HINT_AFTER_STEPS = 20  # the speed is measured over this many steps before a long run is pointed out
LONG_RUN_S = 20 * 60  # a run expected to take longer than this gets a hint


def long_run_hint(remaining_s: float, tokens_per_s: float) -> str | None:
    """A line for a run that will take long on the CPU, else None."""
    if remaining_s <= LONG_RUN_S:
        return None
    return (f"[yellow]hint:[/] at {tokens_per_s:,.0f} tokens/s this run needs about {_duration(remaining_s)} more on "
            "this CPU; for a first model, a smaller one finishes sooner (the README's first command: "
            "--cell gru --layers 1 --hidden 256 --batch-size 16 --seq-len 64 --steps 1000), or train on a GPU "
            "(--device cuda)")


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def parse_eval_every(value: str | int) -> int | str:
    """--eval-every: a number of steps, or `epoch` (once per pass over the training part)."""
    text = str(value).strip().lower()
    if text == EVAL_EVERY_EPOCH:
        return EVAL_EVERY_EPOCH
    try:
        steps = int(text)
    except ValueError:
        steps = 0
    if steps < 1:
        raise InvalidParameterError(f"--eval-every: {value!r} is neither a positive number of steps nor 'epoch'")
    return steps


def model_config(*, cell: str, layers: int, hidden: int, embedding: int, dropout: float, tie: bool | None) -> ModelConfig:
    """--tie shares the embedding with the decoder and needs equal sizes; without --tie/--no-tie, tie where they are equal."""
    if tie and embedding not in (0, hidden):
        raise InvalidParameterError(
            f"--tie: the decoder can share the embedding only when --embedding is 0 or equals --hidden "
            f"(here --embedding {embedding}, --hidden {hidden}); drop --tie or use --no-tie"
        )
    return ModelConfig(cell=cell, hidden_size=hidden, num_layers=layers, embedding_size=embedding,
                       dropout=dropout, tie_weights=tie is not False)


def describe_loss(loss: float, tokenizer_kind: str) -> str:
    """A loss in nats and bits per token, with the perplexity for word-level models."""
    text = f"{loss:.4f} nats/token ({loss / math.log(2):.4f} bits)"
    if tokenizer_kind not in SYMBOL_TOKENIZERS:
        text += f", perplexity {math.exp(min(loss, 700.0)):.2f}"
    return text


def _unknown_summary(corpus: dict) -> str:
    if "train_unknown" not in corpus:
        return ""
    parts = [f"{corpus[f'{part}_unknown']:,} of {corpus[f'{part}_tokens']:,} {label} tokens "
             f"({corpus[f'{part}_unknown'] / max(1, corpus[f'{part}_tokens']):.2%})"
             for part, label in (("train", "training"), ("val", "validation"))]
    return "\n<unk> (outside the vocabulary): " + ", ".join(parts)


def run_training(tokenizers: TokenizerKinds | None = None, **options) -> Trainer:
    """`rnngen train` with the CLI's options: on this process's device, among torchrun's processes if any.
    `tokenizers`: the kinds --tokenizer may name (the CLI passes the plugins' too)."""
    placement = distributed.start(options["device"])
    try:
        return _train(placement, tokenizers, **options)
    finally:
        distributed.stop(placement)


def _train(placement: distributed.Placement, tokenizers: TokenizerKinds | None, *, data: Path, out: Path | None, cell: str, layers: int, hidden: int,
           embedding: int, tokenizer: str, max_vocab: int, seq_len: int, batch_size: int, lr: float, warmup: int,
           weight_decay: float, dropout: float, grad_clip: float, steps: int | None, epochs: float | None,
           val_fraction: float | None, val_file: Path | None, eval_every: str, sample_tokens: int, plot: bool,
           seed: int, threads: int, tie: bool | None, device: str, precision: str | None, resume: Path | None,
           force: bool) -> Trainer:
    if val_file is not None and val_fraction is not None:
        raise InvalidParameterError("give either --val-fraction or --val-file, not both")
    console = Console(highlight=False, quiet=not placement.is_main)  # rank 0 speaks for every process
    where = f"{placement.device.type}" + (f", {placement.world_size} processes" if placement.distributed else "")
    if resume is not None:
        last = Path(resume) / "last.json"
        if not last.is_file():
            raise CheckpointError(f"--resume: no last.json in {resume}")
        meta = load_checkpoint(last).meta
        saved = dict(meta["train"], data=str(data), out_dir=str(resume), device=device)
        for name, value in (("steps", steps), ("precision", precision), ("val_file", val_file)):
            if value is not None:
                saved[name] = str(value) if name == "val_file" else value
        train_cfg = TrainConfig(**saved)
        model_cfg = ModelConfig.from_dict(meta["model"])
        trainer = placement.agree(lambda: Trainer(model_cfg, train_cfg, resume_from=last, placement=placement, tokenizers=tokenizers))
        if trainer.corpus["chars"] != meta["corpus"]["chars"]:
            raise DataError(
                f"--resume: {data} has {trainer.corpus['chars']:,} characters, the run was trained on "
                f"{meta['corpus']['chars']:,} ({meta['corpus']['name']}); resume with the same file"
            )
        console.print(f"resuming {resume} at step {trainer.step} of {train_cfg.steps} on {where}")
    else:
        if steps is not None and epochs is not None:
            raise InvalidParameterError("give either --steps or --epochs, not both")
        model_cfg = model_config(cell=cell, layers=layers, hidden=hidden, embedding=embedding, dropout=dropout, tie=tie)
        train_cfg = TrainConfig(
            data=str(data), out_dir=str(out or Path("runs") / cell), tokenizer=tokenizer, max_vocab=max_vocab,
            seq_len=seq_len, batch_size=batch_size, lr=lr, warmup_steps=warmup, weight_decay=weight_decay,
            grad_clip=grad_clip, steps=steps if steps is not None else 5000,
            val_fraction=val_fraction if val_fraction is not None else 0.1,
            val_file=None if val_file is None else str(val_file), eval_every=parse_eval_every(eval_every),
            sample_tokens=sample_tokens, plot=plot, seed=seed, threads=threads, device=device,
            precision=precision or "fp32",
        )
        trainer = placement.agree(lambda: Trainer(model_cfg, train_cfg, force=force, epochs=epochs, placement=placement, tokenizers=tokenizers))
        train_cfg = trainer.cfg
        c = trainer.model.config
        console.print(
            f"{c.cell} {c.num_layers}x{c.hidden_size}, {trainer.model.num_parameters():,} parameters, "
            f"{trainer.tokenizer.kind} vocabulary of {c.vocab_size}, embedding {c.input_size} "
            f"{'tied to' if c.tied else 'separate from'} the decoder; {trainer.corpus['train_tokens']:,} training / "
            f"{trainer.corpus['val_tokens']:,} validation tokens; {train_cfg.steps} steps "
            f"({train_cfg.steps / trainer.train.chunks:.1f} epochs) on {where}, {train_cfg.precision} "
            f"-> {train_cfg.out_dir}{_unknown_summary(trainer.corpus)}"
        )

    kind = trainer.tokenizer.kind
    live = console.is_terminal and placement.is_main
    log_every = max(1, trainer.eval_interval // LOG_LINES_PER_EVAL)
    first_step = trainer.step
    columns = (
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
    )
    speed = {"tps": 0.0}
    latest: dict = {"step": None, "val": math.nan}  # the last step's report and the last validation loss
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    with Progress(*columns, console=console, disable=not live) as progress:
        task = progress.add_task("train", total=train_cfg.steps, completed=trainer.step, info="")

        def show() -> str:
            """The progress line's fields from the latest step and evaluation."""
            r = latest["step"]
            val = "" if math.isnan(latest["val"]) else f"val {latest['val']:.4f} | "
            text = f"loss {r.loss:.4f} | {val}{speed['tps']:,.0f} tok/s | lr {r.lr:.2e}"
            progress.update(task, completed=r.step, info=text)
            return text

        def on_step(r: StepReport) -> None:
            speed["tps"] = r.tokens_per_s if speed["tps"] == 0 else 0.9 * speed["tps"] + 0.1 * r.tokens_per_s
            latest["step"] = r
            text = show()
            if not live and (r.step % log_every == 0 or r.step == 1):
                console.print(f"step {r.step}/{train_cfg.steps} {text}")
            if r.step - first_step == ETA_HINT_AFTER_STEPS and placement.device.type == "cpu":
                hint = long_run_hint((train_cfg.steps - r.step) * tokens_per_step / speed["tps"], speed["tps"])
                if hint:
                    console.print(hint)

        def on_eval(r: EvalReport) -> None:
            latest["val"] = r.val_loss
            if latest["step"] is not None:
                show()
            console.print(f"[bold]step {r.step}[/]: validation loss {describe_loss(r.val_loss, kind)}, "
                          f"best {trainer.best_val:.4f}")
            if r.sample:
                console.print(Panel(r.sample, title=f"sample at step {r.step}", title_align="left", expand=False), markup=False)

        if placement.is_main:
            trainer.on_step, trainer.on_eval = on_step, on_eval
        trainer.run()
    distributed.write_param_digest(trainer.model, placement)
    if trainer.step < train_cfg.steps:
        console.print(f"stopped at step {trainer.step}; continue with: rnngen train {data} --resume {train_cfg.out_dir}")
    else:
        console.print(
            f"done: {trainer.step} steps in {trainer.train_seconds / 60:.1f} min of training, best validation loss "
            f"{describe_loss(trainer.best_val, kind)}; checkpoints{' and loss.png' if train_cfg.plot else ''} "
            f"in {train_cfg.out_dir}"
        )
    return trainer
