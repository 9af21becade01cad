"""`rnngen export`: checkpoint → one self-contained ONNX file, checked before it is written.

Checks, in order: onnx.checker (full, with shape inference), then onnxruntime
against the PyTorch model on random tokens and random state for several
(batch, time) shapes, time = 1 included. Nothing is written unless both pass.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from rnngen.checks import check_output_file
from rnngen.errors import CheckpointError, ExportCheckError
from rnngen.model.file import make_metadata
from rnngen.model.tokenizers import TokenizerKinds
from rnngen.model.loop_graph import LOGITS, TOKENS, build_model, state_output_name
from rnngen.training.checkpoint import load_checkpoint
from rnngen.training.model import RNNLanguageModel

PARITY_TOLERANCE = 1e-4
PARITY_SHAPES = ((3, 17), (2, 1), (1, 64))  # (batch, time)


@dataclass
class ExportReport:
    path: Path
    bytes: int
    parameters: int
    max_logit_diff: float
    max_state_diff: float
    shapes: tuple[tuple[int, int], ...]


def parity(proto: onnx.ModelProto, model: RNNLanguageModel, seed: int = 0) -> tuple[float, float]:
    """Largest |onnxruntime - PyTorch| over logits and over state, on random input of several shapes."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    cfg = model.config
    gen = np.random.default_rng(seed)
    max_logits = max_state = 0.0
    model.eval()
    for batch, time in PARITY_SHAPES:
        tokens = gen.integers(0, cfg.vocab_size, size=(batch, time), dtype=np.int64)
        state = [gen.normal(0, 0.5, size=(cfg.num_layers, batch, cfg.hidden_size)).astype(np.float32) for _ in cfg.state_names]
        feeds = {TOKENS: tokens, **dict(zip(cfg.state_names, state))}
        ort_logits, *ort_state = session.run([LOGITS, *(state_output_name(s) for s in cfg.state_names)], feeds)
        with torch.no_grad():
            pt_logits, pt_state = model(torch.from_numpy(tokens), tuple(torch.from_numpy(s) for s in state))
        max_logits = max(max_logits, float(np.abs(ort_logits - pt_logits.numpy()).max()))
        for a, b in zip(ort_state, pt_state):
            max_state = max(max_state, float(np.abs(a - b.numpy()).max()))
    return max_logits, max_state


def training_summary(meta: dict) -> dict:
    """What the model file records about how it was trained."""
    corpus = meta.get("corpus", {})
    best = meta.get("best_val_loss")
    return {
        "corpus": corpus.get("name"),
        "corpus_chars": corpus.get("chars"),
        "corpus_tokens": corpus.get("tokens"),
        # validated on a separate file (val_file) or on the held-out end of the corpus (val_fraction)
        "val_fraction": None if meta.get("train", {}).get("val_file") else meta.get("train", {}).get("val_fraction"),
        "val_file": corpus.get("val_name"),
        "val_loss": best,
        "val_bits": None if best is None else best / math.log(2),
        "steps": meta.get("step"),
        "train_seconds": round(meta.get("train_seconds", 0.0), 1),
        "parameters": meta.get("parameters"),
    }


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, force: bool = False,
                      tokenizers: TokenizerKinds | None = None) -> ExportReport:
    out = Path(output)
    check_output_file(out, force=force)
    ckpt = load_checkpoint(checkpoint, tokenizers)
    config, tokenizer = ckpt.config, ckpt.tokenizer
    model = RNNLanguageModel(config)
    try:
        model.load_weights(ckpt.model_state())
    except ValueError as exc:
        raise CheckpointError(f"{checkpoint}: {exc}") from None
    model.eval()

    metadata = make_metadata(config, tokenizer, training_summary(ckpt.meta))
    proto = build_model(config, model.numpy_weights(), metadata)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportCheckError(f"onnx.checker rejected the graph: {exc}") from None
    max_logits, max_state = parity(proto, model)
    if not (max_logits <= PARITY_TOLERANCE and max_state <= PARITY_TOLERANCE):
        raise ExportCheckError(
            f"onnxruntime and PyTorch disagree: max |diff| logits {max_logits:.3g}, state {max_state:.3g} "
            f"(allowed {PARITY_TOLERANCE}); nothing written"
        )
    data = proto.SerializeToString()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return ExportReport(out, len(data), model.num_parameters(), max_logits, max_state, PARITY_SHAPES)
