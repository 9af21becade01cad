"""Looking inside models: recording, features, the unit search on a planted feature, the
HTML report in a real browser, and per-token details while generating."""

import json
import os
import random
import re
import shutil
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from rnngen.inspect import features as F
from rnngen.cli import create_app
from rnngen.model.config import ModelConfig
from rnngen.errors import InvalidParameterError
from rnngen.decoding.generation import generate
from rnngen.inspect.recording import ActivationRecorder, analyse, correlations, token_char_index
from rnngen.model.units import parse_unit
from rnngen.model.runtime import RnnModel
from rnngen.decoding.params import GenerationParams

app = create_app()
QUOTE_UNIT_THRESHOLD = 0.7  # |r| the unit search must reach on the planted quote feature (measured: 0.88)


def planted_quotes_text(seed: int = 0, words: int = 6000) -> str:
    """Lower-case words; now and then a quoted span of 2-6 words in capitals. Predicting the case
    of the next word needs the model to remember, across spaces, whether a quote is open."""
    rng = random.Random(seed)
    vocab = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "see", "it", "was", "red", "big"]
    out, inside, left, line = [], False, 0, 0
    for _ in range(words):
        if not inside and rng.random() < 0.15:
            inside, left = True, rng.randint(2, 6)
            word = '"' + rng.choice(vocab).upper()
        else:
            word = rng.choice(vocab).upper() if inside else rng.choice(vocab)
        if inside:
            left -= 1
            if left == 0:
                word, inside = word + '"', False
        out.append(word)
        line += len(word) + 1
        if line > 60 and not inside:
            out.append("\n")
            line = 0
    return " ".join(out).replace(" \n ", "\n")


def test_unit_search_finds_the_planted_quote_unit(tmp_path):
    torch = pytest.importorskip("torch")
    from rnngen.training.export import export_checkpoint
    from rnngen.training.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    text = planted_quotes_text()
    corpus = tmp_path / "planted.txt"
    corpus.write_text(text)
    Trainer(ModelConfig(cell="lstm", hidden_size=32, num_layers=1),
            TrainConfig(data=str(corpus), out_dir=str(tmp_path / "run"), seq_len=64, batch_size=16, steps=150,
                        eval_every=150, sample_tokens=0, warmup_steps=10, lr=1e-2, threads=2)).run()
    export_checkpoint(tmp_path / "run", tmp_path / "planted.onnx")
    model = RnnModel.load(tmp_path / "planted.onnx", device="cpu")
    analysis = analyse(model, text[-6000:])
    quotes = next(f for f in analysis.features if f.name == "inside_quotes")
    unit, r = quotes.top[0]
    assert abs(r) > QUOTE_UNIT_THRESHOLD, quotes.top
    # The unit really separates the two situations: its mean inside quotes and outside differ clearly.
    column = analysis.recording.column(unit)
    inside = analysis.feature_values["inside_quotes"] > 0
    gap = abs(column[inside].mean() - column[~inside].mean())
    assert gap > column.std()
    # A text with no quotes leaves the feature absent rather than inventing a correlation
    no_quotes = analyse(model, "the cat sat on a mat\n" * 20)
    assert not next(f for f in no_quotes.features if f.name == "inside_quotes").present


def test_recorded_states_and_surprise_match_the_model(char_model_file):
    model = RnnModel.load(char_model_file, device="cpu")
    text = "the quick brown fox jumps over the lazy dog.\n"
    ids, _ = token_char_index(text, model.tokenizer)
    rec = ActivationRecorder(model).record(ids)
    start = model.tokenizer.start_ids()
    logits, state = model.run(np.array([start + ids], dtype=np.int64), model.initial_state(1))
    # After the last token, h and c of every layer equal the Loop graph's final state
    for kind in ("h", "c"):
        for layer in range(2):
            recorded = [rec.column(parse_unit(f"l{layer}.{kind}[{i}]", model.config)) [-1] for i in range(16)]
            np.testing.assert_allclose(recorded, state[kind][layer, 0], atol=1e-5)
    # Gates are there too (4 LSTM gates x 2 layers x 16), each a sigmoid or tanh value
    gates = [u for u in rec.units if u.kind in "ifgo"]
    assert len(gates) == 4 * 2 * 16
    sig = rec.activations[:, [rec.units.index(u) for u in gates if u.kind != "g"]]
    assert sig.min() >= 0 and sig.max() <= 1
    # Surprise of token t is -log2 p(token t) under the prediction made before it
    log_p = logits[0] - np.log(np.exp(logits[0].astype(np.float64)).sum(axis=1, keepdims=True))
    expected = [-log_p[len(start) - 1 + t, tok] / np.log(2) for t, tok in enumerate(ids)]
    np.testing.assert_allclose(rec.surprise_bits, expected, rtol=1e-4)
    assert (rec.entropy_bits >= 0).all() and (rec.entropy_bits <= np.log2(model.config.vocab_size) + 1e-6).all()


def test_features_and_correlation():
    text = 'ab "c(d)"\n[x]e'
    assert F.line_position(text).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    assert F.inside_double_quotes(text).tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert F.paren_depth(text).tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert F.bracket_depth(text).tolist()[10:] == [1, 1, 0, 0]
    assert F.line_start(text).tolist()[9] == 1 and F.line_start(text).sum() == 1
    assert F.regex_feature(r"\[.\]")(text).tolist()[10:] == [1, 1, 1, 0]
    with pytest.raises(InvalidParameterError, match="not a valid regular expression"):
        F.regex_feature("(")
    with pytest.raises(InvalidParameterError, match="is not NAME=REGEX"):
        F.parse_feature_option("nothing")
    acts = np.array([[1.0, 5.0, 2.0], [2.0, 5.0, 4.0], [3.0, 5.0, 6.0]])
    r = correlations(acts, np.array([[1.0], [2.0], [3.0]]))
    assert r[0, 0] == pytest.approx(1.0) and np.isnan(r[0, 1]) and r[0, 2] == pytest.approx(1.0)


def test_byte_models_map_bytes_to_characters(byte_model_file):
    model = RnnModel.load(byte_model_file, device="cpu")
    ids, chars = token_char_index("aé€", model.tokenizer)
    assert len(ids) == 6 and chars.tolist() == [0, 1, 1, 2, 2, 2]
    analysis = analyse(model, "aé€\n" * 10)
    assert analysis.recording.activations.shape == (70, 16 * 4)  # 7 bytes a line; GRU h and its r, z, n gates
    # Every byte of a character carries that character's feature value
    assert analysis.feature_values["line_position"][:7].tolist() == [1, 2, 2, 3, 3, 3, 0]


def test_unit_names_are_checked(char_model_file):
    cfg = RnnModel.load(char_model_file, device="cpu").config
    assert parse_unit("l1.c[15]", cfg).name == "l1.c[15]"
    for spec, needle in (("h3", "is not LAYER.KIND[INDEX]"), ("l2.h[0]", "layer 2 is not in 0..1"),
                         ("l0.h[16]", "index 16 is not in 0..15"), ("l0.r[0]", "kind 'r' is not one of h, c, i, f, g, o")):
        with pytest.raises(InvalidParameterError, match=re.escape(needle)):
            parse_unit(spec, cfg)


def test_inspect_cli_json_html_and_no_overwrite(char_model_file, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text('to be "or not" to be\nthat is the question\n' * 5)
    result = CliRunner().invoke(app, ["inspect", str(text), "-m", str(char_model_file), "--json",
                                      "--feature", "vowel=[aeiou]", "--unit", "l0.h[3]", "--top", "3", "--unknown", "replace"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tokens"] == data["chars"] == 210 and data["units_recorded"] == 16 * 2 * 6
    assert len(data["surprise_bits"]) == 210 and len(data["activations"]["l0.h[3]"]) == 210
    by_name = {f["name"]: f for f in data["features"]}
    assert by_name["vowel"]["source"] == "regex" and len(by_name["vowel"]["top"]) == 3
    assert by_name["inside_parens"]["present"] is False and by_name["inside_quotes"]["present"] is True
    rs = [abs(t["r"]) for t in by_name["line_position"]["top"]]
    assert rs == sorted(rs, reverse=True)
    report = tmp_path / "report.html"
    strict = CliRunner().invoke(app, ["inspect", str(text), "-m", str(char_model_file), "-o", str(report)])
    assert strict.exit_code == 1 and "U+0022 QUOTATION MARK" in strict.stderr and not report.exists()
    made = CliRunner().invoke(app, ["inspect", str(text), "-m", str(char_model_file), "-o", str(report), "--unknown", "replace"])
    assert made.exit_code == 0, made.output
    page = report.read_text()
    assert page.startswith("<!doctype html>") and "http" not in page.split("<script")[0].lower().replace("http-equiv", "")
    again = CliRunner().invoke(app, ["inspect", str(text), "-m", str(char_model_file), "-o", str(report), "--unknown", "replace"])
    assert again.exit_code == 1 and "exists; use --force" in again.stderr and report.read_text() == page
    bad = CliRunner().invoke(app, ["inspect", str(text), "-m", str(char_model_file), "--json", "--unit", "l5.h[0]"])
    assert bad.exit_code == 1 and "layer 5 is not in 0..1" in bad.stderr


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(char_model_file, tmp_path):
    browser = _browser()
    if browser is None:
        if os.environ.get("RNNGEN_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed (the CI set-up installs Debian's chromium package)")
        pytest.skip("chromium is not installed")
    plt = pytest.importorskip("matplotlib.pyplot")
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be\nthat is the question\n" * 20)
    report = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["inspect", str(text), "-m", str(char_model_file), "-o", str(report)])
    assert result.exit_code == 0, result.output
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,900"]
    dom = subprocess.run([*flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom  # the page's script ran to the end
    assert dom.count("<span data-i=") == 800 and 'class="unit' in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = plt.imread(shot)[..., :3]
    assert pixels.shape[:2] == (900, 1200)
    assert pixels.std() > 0.05  # not blank
    # Character backgrounds are translucent red (above the unit's mean) and blue (below) on white.
    red = pixels[..., 0] - pixels[..., 2] > 0.15
    blue = pixels[..., 2] - pixels[..., 0] > 0.15
    assert red.sum() > 2000 and blue.sum() > 2000, (red.sum(), blue.sum())  # well beyond the legend's swatches


def test_generation_details_per_token(char_model_file):
    model = RnnModel.load(char_model_file, device="cpu")
    params = GenerationParams(max_new_tokens=25, temperature=0.0, introspect=True, top_alternatives=4,
                              units=("l1.h[5]", "l0.c[0]"))
    seq = generate(model, "the ", params).sequences[0]
    assert len(seq.details) == 25
    assert sum(d["logprob"] for d in seq.details) == pytest.approx(seq.logprob, abs=1e-3)
    ids = model.tokenizer.encode("the ")
    for k, d in enumerate(seq.details):
        probs = [a["prob"] for a in d["top"]]
        assert len(probs) == 4 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert d["top"][0]["token_id"] == d["token_id"]  # greedy: the most likely token
        # units: the state the token was predicted from, i.e. after the prompt and the tokens before it
        before = ids + [x["token_id"] for x in seq.details[:k]]
        _, state = model.run(np.array([before], dtype=np.int64), model.initial_state(1))
        assert d["units"]["l1.h[5]"] == pytest.approx(float(state["h"][1, 0, 5]), abs=1e-4)
        assert d["units"]["l0.c[0]"] == pytest.approx(float(state["c"][0, 0, 0]), abs=1e-4)
    plain = generate(model, "the ", GenerationParams(max_new_tokens=25, temperature=0.0)).sequences[0]
    assert plain.text == seq.text and plain.details == [] and "details" not in plain.to_dict()
    with pytest.raises(InvalidParameterError, match="with introspect on"):
        GenerationParams(units=("l0.h[0]",))


def test_generate_cli_introspect(char_model_file):
    result = CliRunner().invoke(app, ["generate", "-m", str(char_model_file), "-n", "5", "--seed", "1", "--json",
                                      "--introspect", "--unit", "l0.h[1]", "--top-alternatives", "2"])
    assert result.exit_code == 0, result.output
    details = json.loads(result.stdout)["sequences"][0]["details"]
    assert len(details) == 5 and all(len(d["top"]) == 2 and set(d["units"]) == {"l0.h[1]"} for d in details)
    no_json = CliRunner().invoke(app, ["generate", "-m", str(char_model_file), "--introspect"])
    assert no_json.exit_code == 1 and "come with --json" in no_json.stderr
