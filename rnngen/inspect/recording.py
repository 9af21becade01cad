"""Look inside a model: record every unit's activation over a text and find the units
that track features of the text.

A *unit* is one number of the model's state or gates at one layer, named like
`l1.c[42]`: layer 1, cell state, unit 42. Kinds: `h` (hidden state, every cell),
`c` (LSTM cell state), LSTM gates `i`, `f`, `g`, `o`, GRU gates `r`, `z`, `n`.

Recording runs the loop-free step graph (rnngen.model.step_graph) one token at a time,
with the gates exposed as extra outputs, so what is recorded is exactly what
generation computes. The activation at a token is the value after the model has
read that token; the surprise and entropy at a token are those of the prediction
the model made for it, from everything before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

import onnx
from onnx import helper

from rnngen.decoding.logits import log_softmax
from rnngen.errors import InvalidParameterError
from rnngen.inspect.features import BUILTIN_FEATURES
from rnngen.model.config import GATES
from rnngen.model.devices import ort_session_options
from rnngen.model.loop_graph import LOGITS, TOKENS, state_output_name
from rnngen.model.runtime import RnnModel, full_proto, sampling_feeds
from rnngen.model.step_graph import derive_step_model
from rnngen.model.units import Unit

@dataclass
class Recording:
    """Per token: every unit's activation, the surprise and entropy of its prediction."""

    units: list[Unit]  # column order of `activations`
    activations: np.ndarray  # (T, U) float32
    surprise_bits: np.ndarray  # (T,) -log2 p(token | before)
    entropy_bits: np.ndarray  # (T,) entropy of the distribution the token was predicted from

    def column(self, unit: Unit) -> np.ndarray:
        return self.activations[:, self._index[unit]]

    def __post_init__(self) -> None:
        self._index = {u: i for i, u in enumerate(self.units)}


class ActivationRecorder:
    """Runs a model over token ids one step at a time, recording every unit."""

    def __init__(self, model: RnnModel):
        import onnxruntime as ort

        self.model = model
        cfg = model.config
        step = derive_step_model(full_proto(model.file))
        step, gate_outputs = add_gate_outputs(step, cfg.cell, cfg.num_layers)
        self._session = ort.InferenceSession(step.SerializeToString(), sess_options=ort_session_options(),
                                             providers=model.providers)
        self._state_outputs = [state_output_name(s) for s in model.state_names]
        self._gate_outputs = gate_outputs
        self._outputs = [LOGITS, *self._state_outputs, *(name for _, _, name in gate_outputs)]
        self._extra_inputs = {i.name for i in self._session.get_inputs()} - {TOKENS, *model.state_names}
        H, L = cfg.hidden_size, cfg.num_layers
        self.units = [Unit(s, layer, i) for s in model.state_names for layer in range(L) for i in range(H)]
        self.units += [Unit(g, layer, i) for g, layer, _ in gate_outputs for i in range(H)]

    def record(self, ids: list[int], on_progress: Callable[[int], None] | None = None) -> Recording:
        model = self.model
        cfg = model.config
        T, H, L = len(ids), cfg.hidden_size, cfg.num_layers
        acts = np.empty((T, len(self.units)), dtype=np.float32)
        surprise = np.empty(T, dtype=np.float64)
        entropy = np.empty(T, dtype=np.float64)
        state = model.initial_state(1)
        extra = {k: v for k, v in sampling_feeds(1).items() if k in self._extra_inputs}
        nstate = len(model.state_names)
        start = model.tokenizer.start_ids()
        # Prime with the tokenizer's start (a newline for char models): the first token gets a prediction too.
        logits = None
        for token in start:
            logits, state, _ = self._step(token, state, extra, nstate)
        for t, token in enumerate(ids):
            log_p = log_softmax(logits)
            surprise[t] = -log_p[token] / math.log(2)
            p = np.exp(log_p)
            entropy[t] = -(p * np.where(p > 0, log_p, 0.0)).sum() / math.log(2)
            logits, state, gates = self._step(token, state, extra, nstate)
            col = 0
            for name in model.state_names:  # (L, 1, H) each
                acts[t, col : col + L * H] = state[name][:, 0, :].reshape(-1)
                col += L * H
            for g in gates:  # (1, H) each
                acts[t, col : col + H] = g[0]
                col += H
            if on_progress is not None and (t % 256 == 255 or t == T - 1):
                on_progress(t + 1)
        return Recording(self.units, acts, surprise, entropy)

    def _step(self, token: int, state: dict, extra: dict, nstate: int):
        feeds = {TOKENS: np.array([[token]], dtype=np.int64), **extra, **state}
        logits, *rest = self._session.run(self._outputs, feeds)
        new_state = dict(zip(self.model.state_names, rest[:nstate]))
        return logits[0, 0].astype(np.float64), new_state, rest[nstate:]


def add_gate_outputs(step: onnx.ModelProto, cell: str, num_layers: int) -> tuple[onnx.ModelProto, list[tuple[str, int, str]]]:
    """A copy of a step graph that also outputs every layer's gate activations, (B, H) each.

    Returns the model and, per added output, (gate, layer, output name). Gates a file
    does not name as rnngen builds them are left out (the model still works, with fewer units).
    """
    model = onnx.ModelProto()
    model.CopyFrom(step)
    produced = {out for node in model.graph.node for out in node.output}
    added = []
    for layer in range(num_layers):
        for gate in GATES[cell]:
            name = f"l{layer}_loop/l{layer}_{gate}"
            if name in produced:
                model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
                added.append((gate, layer, name))
    return model, added


def correlations(activations: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Pearson r between every feature (T, F) and every unit (T, U): (F, U); NaN where either is constant."""
    a = activations.astype(np.float64) - activations.mean(axis=0, dtype=np.float64)
    f = features.astype(np.float64) - features.mean(axis=0)
    a_norm = np.sqrt((a * a).sum(axis=0))
    f_norm = np.sqrt((f * f).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (f.T @ a) / np.outer(f_norm, a_norm)
    r[~np.isfinite(r)] = np.nan
    return np.clip(r, -1.0, 1.0)


def token_char_index(text: str, tokenizer, on_unknown: str = "error") -> tuple[list[int], np.ndarray]:
    """Token ids of `text` and, per token, the index of the character it ends in.

    Char models: one token per character. Byte models: a character's bytes all map to it.
    Word models are not supported: their features would need word-level definitions.
    """
    if tokenizer.kind == "byte":
        ids = tokenizer.encode(text)
        sizes = [len(ch.encode("utf-8")) for ch in text]
        return ids, np.repeat(np.arange(len(text)), sizes)
    if tokenizer.kind == "word":
        raise InvalidParameterError("inspect: word-level models are not supported; use a char- or byte-level model")
    if on_unknown == "skip":
        raise InvalidParameterError("--unknown: skip would misalign tokens and characters; use error or replace")
    ids = tokenizer.encode(text, on_unknown=on_unknown)
    if len(ids) != len(text):
        raise InvalidParameterError(f"inspect: the {tokenizer.kind} tokenizer does not give one token per character")
    return ids, np.arange(len(text))


@dataclass
class FeatureResult:
    name: str
    help: str
    source: str  # builtin, a plugin's name, or "regex"
    present: bool  # False where the feature is constant over the text (no correlation defined)
    top: list[tuple[Unit, float]]


@dataclass
class Analysis:
    text: str
    recording: Recording
    char_index: np.ndarray  # (T,) character each token ends in
    features: list[FeatureResult]
    feature_values: dict[str, np.ndarray]  # per token

    def best(self, count: int = 10) -> list[tuple[str, Unit, float]]:
        pairs = [(f.name, u, r) for f in self.features for u, r in f.top[:1]]
        return sorted(pairs, key=lambda p: -abs(p[2]))[:count]


def analyse(model: RnnModel, text: str, extra_features: dict[str, tuple[Callable, str, str]] | None = None,
            top: int = 5, on_progress: Callable[[int], None] | None = None,
            recorder: ActivationRecorder | None = None, on_unknown: str = "error",
            features: dict[str, tuple[Callable, str, str]] | None = None) -> Analysis:
    """Record `model` over `text` and rank the units by |r| with each feature.

    Features, name -> (compute, help, source): `features` (the CLI passes every registered
    one, plugins' included; default: the built-ins) plus `extra_features`. They are computed
    on the text as it is, also where `on_unknown="replace"` feeds the model a stand-in for
    characters outside its vocabulary.
    """
    if not text:
        raise InvalidParameterError("inspect: the text is empty")
    ids, char_index = token_char_index(text, model.tokenizer, on_unknown)
    recorder = recorder or ActivationRecorder(model)
    recording = recorder.record(ids, on_progress)
    if features is None:
        features = {name: (compute, help_text, "rnngen") for name, (compute, help_text) in BUILTIN_FEATURES.items()}
    computes = dict(features)
    for name, value in (extra_features or {}).items():
        if name in computes:
            raise InvalidParameterError(f"feature: {name!r} is already a feature ({computes[name][2]}); choose another name")
        computes[name] = value
    values, results = {}, []
    for name, (compute, help_text, source) in computes.items():
        per_char = np.asarray(compute(text), dtype=np.float64)
        if per_char.shape != (len(text),):
            raise InvalidParameterError(f"feature {name!r} ({source}) gave {per_char.shape} values for {len(text)} characters")
        values[name] = per_char[char_index]
    names = list(values)
    r = correlations(recording.activations, np.stack([values[n] for n in names], axis=1))
    for k, name in enumerate(names):
        row = r[k]
        present = bool(np.isfinite(row).any())
        order = np.argsort(-np.nan_to_num(np.abs(row), nan=-1.0))[:top] if present else []
        results.append(FeatureResult(name, computes[name][1], computes[name][2], present,
                                     [(recording.units[i], float(row[i])) for i in order]))
    return Analysis(text, recording, char_index, results, values)


def analysis_to_dict(analysis: Analysis, model: RnnModel, units: list[Unit] = ()) -> dict:
    rec = analysis.recording
    cfg = model.config
    out = {
        "model": str(model.file.path),
        "cell": cfg.cell, "layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
        "tokenizer": model.tokenizer.kind,
        "chars": len(analysis.text), "tokens": len(rec.surprise_bits),
        "units_recorded": len(rec.units),
        "mean_surprise_bits": float(rec.surprise_bits.mean()),
        "mean_entropy_bits": float(rec.entropy_bits.mean()),
        "features": [{"name": f.name, "help": f.help, "source": f.source, "present": f.present,
                      "top": [{"unit": u.name, "r": round(r, 4)} for u, r in f.top]} for f in analysis.features],
        "best": [{"feature": name, "unit": u.name, "r": round(r, 4)} for name, u, r in analysis.best()],
        "surprise_bits": [round(float(x), 3) for x in rec.surprise_bits],
        "entropy_bits": [round(float(x), 3) for x in rec.entropy_bits],
    }
    if units:
        out["activations"] = {u.name: [round(float(x), 4) for x in rec.column(u)] for u in units}
    return out
