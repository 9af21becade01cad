"""`rnngen train` as the user sees it: configs from CLI options, a live progress display, samples."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rnngen.model.config import ModelConfig
from rnngen.errors import CheckpointError, DataError
from rnngen.model.tokenizers import TokenizerKinds
from rnngen.training.checkpoint import load_checkpoint
from rnngen.training.trainer import EvalReport, StepReport, TrainConfig, Trainer

LOG_LINES_PER_EVAL = 5  # without a terminal (a log file), a plain line this often per evaluation interval
ETA_HINT_AFTER_STEPS = 20  # the speed is measured over this many steps before a long run is pointed out
LONG_RUN_S = 20 * 60  # a run expected to take longer than this gets a hint


def long_run_hint(remaining_s: float, tokens_per_s: float) -> str | None:
    """A line for a run that will take long on this CPU (training runs on the CPU), else None."""
    if remaining_s <= LONG_RUN_S:
        return None
    return (f"[yellow]hint:[/] at {tokens_per_s:,.0f} tokens/s this run needs about {_duration(remaining_s)} more on "
            "this CPU; for a first model, a smaller one finishes in minutes (the README's first command: "
            "--cell gru --layers 1 --hidden 256 --batch-size 16 --seq-len 64 --steps 1000), or use more cores")


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def run_training(*, data: Path, out: Path | None, cell: str, layers: int, hidden: int, embedding: int,
                 tokenizer: str, max_vocab: int, seq_len: int, batch_size: int, lr: float, warmup: int,
                 weight_decay: float, dropout: float, grad_clip: float, steps: int | None, epochs: float | None,
                 val_fraction: float, eval_every: int, sample_tokens: int, seed: int, threads: int,
                 no_tie: bool, resume: Path | None, force: bool, tokenizers: TokenizerKinds | None = None) -> Trainer:
    console = Console(highlight=False)
    if resume is not None:
        last = Path(resume) / "last.json"
        if not last.is_file():
            raise CheckpointError(f"--resume: no last.json in {resume}")
        meta = load_checkpoint(last).meta
        saved = dict(meta["train"], data=str(data), out_dir=str(resume))
        if steps is not None:
            saved["steps"] = steps
        train_cfg = TrainConfig(**saved)
        model_cfg = ModelConfig.from_dict(meta["model"])
        trainer = Trainer(model_cfg, train_cfg, resume_from=last, tokenizers=tokenizers)
        if trainer.corpus["chars"] != meta["corpus"]["chars"]:
            raise DataError(
                f"--resume: {data} has {trainer.corpus['chars']:,} characters, the run was trained on "
                f"{meta['corpus']['chars']:,} ({meta['corpus']['name']}); resume with the same file"
            )
        console.print(f"resuming {resume} at step {trainer.step} of {train_cfg.steps}")
    else:
        if steps is not None and epochs is not None:
            from rnngen.errors import InvalidParameterError

            raise InvalidParameterError("give either --steps or --epochs, not both")
        model_cfg = ModelConfig(cell=cell, hidden_size=hidden, num_layers=layers, embedding_size=embedding,
                                dropout=dropout, tie_weights=not no_tie)
        train_cfg = TrainConfig(
            data=str(data), out_dir=str(out or Path("runs") / cell), tokenizer=tokenizer, max_vocab=max_vocab,
            seq_len=seq_len, batch_size=batch_size, lr=lr, warmup_steps=warmup, weight_decay=weight_decay,
            grad_clip=grad_clip, steps=steps if steps is not None else 5000, val_fraction=val_fraction,
            eval_every=eval_every, sample_tokens=sample_tokens, seed=seed, threads=threads,
        )
        trainer = Trainer(model_cfg, train_cfg, force=force, epochs=epochs, tokenizers=tokenizers)
        train_cfg = trainer.cfg
        c = trainer.model.config
        console.print(
            f"{c.cell} {c.num_layers}x{c.hidden_size}, {trainer.model.num_parameters():,} parameters, "
            f"{trainer.tokenizer.kind} vocabulary of {c.vocab_size}; {trainer.corpus['train_tokens']:,} training / "
            f"{trainer.corpus['val_tokens']:,} validation tokens; {train_cfg.steps} steps "
            f"({train_cfg.steps / trainer.train.chunks:.1f} epochs) -> {train_cfg.out_dir}"
        )

    live = console.is_terminal
    first_step = trainer.step
    log_every = max(1, train_cfg.eval_every // LOG_LINES_PER_EVAL)
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
            if r.step - first_step == ETA_HINT_AFTER_STEPS:
                hint = long_run_hint((train_cfg.steps - r.step) * tokens_per_step / speed["tps"], speed["tps"])
                if hint:
                    console.print(hint)

        def on_eval(r: EvalReport) -> None:
            latest["val"] = r.val_loss
            if latest["step"] is not None:
                show()
            console.print(
                f"[bold]step {r.step}[/]: validation loss {r.val_loss:.4f} nats/token "
                f"({r.val_loss / math.log(2):.4f} bits), best {trainer.best_val:.4f}"
            )
            if r.sample:
                console.print(Panel(r.sample, title=f"sample at step {r.step}", title_align="left", expand=False), markup=False)

        trainer.on_step, trainer.on_eval = on_step, on_eval
        trainer.run()
    if trainer.step < train_cfg.steps:
        console.print(f"stopped at step {trainer.step}; continue with: rnngen train {data} --resume {train_cfg.out_dir}")
    else:
        console.print(
            f"done: {trainer.step} steps in {trainer.train_seconds / 60:.1f} min of training, best validation loss "
            f"{trainer.best_val:.4f} nats/token; checkpoints and loss.png in {train_cfg.out_dir}"
        )
    return trainer
