"""Look inside a model: record every unit's activation over a text and find the units
that track features of the text.

A *unit* is one number of the model's state or gates at one layer, named like
`l1.c[42]`: layer 1, cell state, unit 42. Kinds: `h` (hidden state, every cell),
`c` (LSTM cell state), LSTM gates `i`, `f`, `g`, `o`, GRU gates `r`, `z`, `n`.

Recording runs the loop-free step graph (rnngen.step_graph) one token at a time,
with the gates exposed as extra outputs, so what is recorded is exactly what
generation computes. The activation at a token is the value after the model has
read that token; the surprise and entropy at a token are those of the prediction
the model made for it, from everything before it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from rnngen.errors import InvalidParameterError
from rnngen.runtime import LOGITS, TOKENS, RnnModel, _full_proto, sampling_feeds, state_output_name
from rnngen.step_graph import GATES, add_gate_outputs, derive_step_model

UNIT_PATTERN = re.compile(r"^l(\d+)\.([a-z])\[(\d+)\]$")
STATE_KINDS = {"h": "h", "c": "c"}  # unit kind -> state name


@dataclass(frozen=True)
class Unit:
    kind: str
    layer: int
    index: int

    @property
    def name(self) -> str:
        return f"l{self.layer}.{self.kind}[{self.index}]"


def unit_kinds(cell: str) -> list[str]:
    return ["h", "c"] + list(GATES[cell]) if cell == "lstm" else ["h", *GATES[cell]]


def parse_unit(spec: str, config, kinds: list[str] | None = None) -> Unit:
    """`l1.h[42]` -> Unit, checked against the model's layers, sizes and unit kinds."""
    kinds = kinds or unit_kinds(config.cell)
    m = UNIT_PATTERN.match(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        raise InvalidParameterError(f"unit: {spec!r} is not LAYER.KIND[INDEX] such as l0.h[12]")
    layer, kind, index = int(m.group(1)), m.group(2), int(m.group(3))
    if kind not in kinds:
        raise InvalidParameterError(f"unit: {spec!r}: kind {kind!r} is not one of {', '.join(kinds)} for this {config.cell}")
    if layer >= config.num_layers:
        raise InvalidParameterError(f"unit: {spec!r}: layer {layer} is not in 0..{config.num_layers - 1}")
    if index >= config.hidden_size:
        raise InvalidParameterError(f"unit: {spec!r}: index {index} is not in 0..{config.hidden_size - 1}")
    return Unit(kind, layer, index)


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
        step = derive_step_model(_full_proto(model.file))
        step, gate_outputs = add_gate_outputs(step, cfg.cell, cfg.num_layers)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self._session = ort.InferenceSession(step.SerializeToString(), sess_options=options,
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
            log_p = _log_softmax(logits)
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


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


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
            recorder: ActivationRecorder | None = None, on_unknown: str = "error") -> Analysis:
    """Record `model` over `text` and rank the units by |r| with each feature.

    Features: every registered one (built-ins and plugins) plus `extra_features`,
    name -> (compute, help, source). They are computed on the text as it is, also where
    `on_unknown="replace"` feeds the model a stand-in for characters outside its vocabulary.
    """
    from rnngen.plugins import registry

    if not text:
        raise InvalidParameterError("inspect: the text is empty")
    ids, char_index = token_char_index(text, model.tokenizer, on_unknown)
    recorder = recorder or ActivationRecorder(model)
    recording = recorder.record(ids, on_progress)
    computes = {name: (e.value, e.help, e.plugin) for name, e in registry().inspect_features().items()}
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


# ---------------------------------------------------------------------- per token, while generating


def state_units(specs: tuple[str, ...], config) -> list[Unit]:
    """Units readable while generating: those of the state (h, and c for LSTMs), not the gates."""
    kinds = [s for s in config.state_names]
    return [parse_unit(spec, config, kinds) for spec in specs]


def token_details(logits: np.ndarray, token: int, top: int, tokenizer, units: list[Unit],
                  state: dict[str, np.ndarray] | None, row: int) -> dict:
    """What the model thought when a token was chosen: its log-probability, the entropy, the
    most likely alternatives (all under the model's own distribution, before any sampling
    processors) and the selected units of the state the token was predicted from."""
    log_p = _log_softmax(logits.astype(np.float64))
    p = np.exp(log_p)
    order = np.argsort(-log_p)[:top] if top else []
    details = {
        "token_id": int(token),
        "text": _token_text(tokenizer, token),
        "logprob": round(float(log_p[token]), 5),
        "entropy": round(float(-(p * log_p).sum()), 5),  # nats
        "top": [{"token_id": int(i), "text": _token_text(tokenizer, i), "prob": round(float(p[i]), 5)} for i in order],
    }
    if units:
        details["units"] = {u.name: round(float(state[u.kind][u.layer, row, u.index]), 5) for u in units}
    return details


def _token_text(tokenizer, token: int) -> str:
    """A token on its own; a byte as an escape such as \\xe2 (alone it may be half a character)."""
    if tokenizer.kind == "byte":
        return repr(bytes([int(token)]))[2:-1]
    return tokenizer.decode([int(token)])
