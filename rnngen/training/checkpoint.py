"""Checkpoints as data: tensors in safetensors, everything else in JSON. Never pickles.

A checkpoint NAME in a run directory is two files:
  NAME.safetensors  model weights ("model.*"), AdamW moments ("optim.*"), the
                    torch RNG states ("rng.torch", "rng.cuda" on a GPU, and
                    "rng.torch.R" / "rng.cuda.R" of data-parallel rank R > 0)
                    and the hidden state carried between training chunks
                    ("carry.*", the whole batch)
  NAME.json         model config, tokenizer, training config, step, optimizer
                    hyper-parameters, loss history, corpus summary
The run keeps `last` (written at every evaluation and on interrupt) and `best`
(the lowest validation loss so far). Tensors are read onto the CPU and moved to
the training device, so a checkpoint moves between CPU and GPU. Both files
are written to temporary names and renamed, the JSON last, so a crash never
leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from rnngen.model.config import ModelConfig
from rnngen.errors import CheckpointError
from rnngen.model.tokenizers import Tokenizer, TokenizerKinds, tokenizer_from_dict

CHECKPOINT_FORMAT = "rnngen-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class Checkpoint:
    meta: dict  # the JSON part
    tensors: dict[str, torch.Tensor]  # the safetensors part
    tokenizer_kinds: TokenizerKinds | None = None  # kinds its tokenizer may be (None: the built-ins)

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.meta["model"])

    @property
    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_dict(self.meta["tokenizer"], self.tokenizer_kinds)

    def model_state(self) -> dict[str, torch.Tensor]:
        return {k[len("model.") :]: v for k, v in self.tensors.items() if k.startswith("model.")}


def save_checkpoint(run_dir: Path, name: str, model, optimizer, meta: dict, carry: tuple,
                    rng_states: dict[str, torch.Tensor]) -> None:
    """Write checkpoint NAME; tensors may live on any device (they are written from the CPU).

    rng_states: "rng.torch" (and "rng.cuda" on a GPU) of the only or first process; "rng.torch.R" and
    "rng.cuda.R" of data-parallel rank R > 0. `carry` is the whole batch's state, every rank's rows.
    """
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.named_parameters()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            value = value.detach().cpu()
            tensors[f"optim.{idx}.{key}"] = value.reshape(-1).contiguous() if value.dim() == 0 else value.contiguous()
    tensors.update({key: value.cpu() for key, value in rng_states.items()})
    for state_name, tensor in zip(model.config.state_names, carry):
        tensors[f"carry.{state_name}"] = tensor.detach().float().cpu().contiguous()
    meta = dict(meta, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, param_groups=opt["param_groups"])
    run_dir.mkdir(parents=True, exist_ok=True)
    weights, info = run_dir / f"{name}.safetensors", run_dir / f"{name}.json"
    # Written by Python rather than safetensors' save_file, which creates files 0600: every file of a
    # run gets the same mode (the umask's), best.* being copies of last.*.
    Path(str(weights) + ".tmp").write_bytes(save(tensors))
    (run_dir / f"{info.name}.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(str(weights) + ".tmp", weights)
    os.replace(run_dir / f"{info.name}.tmp", info)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory (its best checkpoint, else last) or a checkpoint's .json/.safetensors file → the .json path."""
    path = Path(path)
    if path.is_dir():
        for name in ("best", "last"):
            if (path / f"{name}.json").is_file():
                return path / f"{name}.json"
        raise CheckpointError(f"no checkpoint (best.json or last.json) in directory {path}")
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | os.PathLike, tokenizers: TokenizerKinds | None = None) -> Checkpoint:
    info = resolve_checkpoint(path)
    try:
        meta = json.loads(info.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{info} is not a valid checkpoint JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{info} is not an rnngen checkpoint")
    if meta.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{info} has checkpoint version {meta.get('version')}, newer than this rnngen reads ({CHECKPOINT_VERSION})")
    weights = info.with_suffix(".safetensors")
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights missing: {weights}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint weights {weights}: {exc}") from None
    return Checkpoint(meta, tensors, tokenizers)


def restore_optimizer(optimizer, checkpoint: Checkpoint) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in checkpoint.tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value.reshape(()) if name == "step" else value
    optimizer.load_state_dict({"state": state, "param_groups": checkpoint.meta["param_groups"]})
