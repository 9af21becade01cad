"""Word-level training as a Penn-Treebank user expects it, and the training options around it."""

import math

import pytest

torch = pytest.importorskip("torch")


from rnngen.model.config import ModelConfig  # noqa: E402
from rnngen.corpus import split_text_at_line  # noqa: E402
from rnngen.errors import DataError  # noqa: E402
from rnngen.model.tokenizers import WordTokenizer, count_unknown, encode_document  # noqa: E402
from rnngen.training.trainer import TrainConfig, Trainer  # noqa: E402

from conftest import invoke, one_line_error  # noqa: E402

TINY = ModelConfig(cell="lstm", hidden_size=16, num_layers=1)




def word_corpus(lines: int = 400) -> str:
    words = "the a cat dog sat ran on under mat log big small".split()
    return "".join(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(3 + i % 4)) + "\n" for i in range(lines))


def config(data, out, **kw):
    base = dict(data=str(data), out_dir=str(out), tokenizer="word", seq_len=8, batch_size=4, steps=4, eval_every=2,
                sample_tokens=0, plot=False, warmup_steps=1, threads=1, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_validation_cut_lands_on_a_line_start():
    text = "one two three\nfour five\nsix seven eight nine\nten\n"
    train, val = split_text_at_line(text, 0.3)  # the exact point falls inside "six seven ..."
    assert train + val == text
    assert train.endswith("\n") and val == "six seven eight nine\nten\n"
    assert split_text_at_line("a b c d e f\ng\n", 0.9) == ("a b c d e f\n", "g\n")  # no line end before the point
    with pytest.raises(DataError, match="--val-file"):
        split_text_at_line("one long line without a break", 0.1)


def test_every_line_ends_with_eos_in_a_document_but_a_prompt_continues():
    tok = WordTokenizer.from_text("a b\nc\n")
    eos = tok.symbols.index("<eos>")
    assert encode_document(tok, "a b\nc") == encode_document(tok, "a b\nc\n") == tok.encode("a b\nc\n")
    assert encode_document(tok, "a b\r\nc\rb") == encode_document(tok, "a b\nc\nb\n")
    assert encode_document(tok, "a b\nc")[-1] == eos
    assert tok.encode("a b") == [tok.symbols.index("a"), tok.symbols.index("b")]  # a prompt's last line goes on


def test_unknown_counts():
    tok = WordTokenizer.from_text("a b <unk>\n")
    assert count_unknown(tok, "a zebra b yak\n<unk>\n") == 2  # literal <unk> is in the vocabulary
    from rnngen.model.tokenizers import ByteTokenizer, CharTokenizer

    assert count_unknown(CharTokenizer.from_text("abc"), "abxyx") == 3
    assert count_unknown(ByteTokenizer(), "anything") is None


def test_word_vocabulary_comes_from_the_training_part_only(tmp_path):
    data = tmp_path / "words.txt"
    data.write_text(word_corpus() + "zebra zebra yak\n")  # words only in the held-out end
    trainer = Trainer(TINY, config(data, tmp_path / "r", val_fraction=0.1))
    symbols = trainer.tokenizer.symbols
    assert "zebra" not in symbols and "yak" not in symbols and "cat" in symbols
    assert trainer.corpus["val_unknown"] == 3 and trainer.corpus["train_unknown"] == 0


def test_val_file_is_the_validation_text(tmp_path):
    data, val = tmp_path / "train.txt", tmp_path / "valid.txt"
    data.write_text(word_corpus())
    val.write_text("the cat sat on the mat\nthe quokka ran")  # no final newline: its last line ends with <eos> too
    trainer = Trainer(TINY, config(data, tmp_path / "r", val_file=str(val)))
    assert trainer.corpus["val_tokens"] == 11 and trainer.corpus["val_unknown"] == 1
    assert trainer.corpus["train_tokens"] == len(encode_document(trainer.tokenizer, word_corpus()))
    trainer.run()
    assert len(trainer.history["val"]) == 2


def test_eval_every_epoch_evaluates_at_each_epoch_end(tmp_path, corpus_file):
    cfg = TrainConfig(data=str(corpus_file), out_dir=str(tmp_path / "r"), seq_len=16, batch_size=16, steps=60,
                      eval_every="epoch", sample_tokens=0, plot=False, threads=1, device="cpu")
    trainer = Trainer(TINY, cfg)
    chunks = trainer.train.chunks
    assert 1 < chunks < 30
    trainer.run()
    assert [s for s, _ in trainer.history["val"]] == [*range(chunks, 60 + 1, chunks), *([60] if 60 % chunks else [])]


def test_no_plot_and_no_samples_cost_nothing(tmp_path, corpus_file, monkeypatch):
    import rnngen.training.plot as plot

    def refuse(*_):
        raise AssertionError("plotted although turned off")
    monkeypatch.setattr(plot, "plot_losses", refuse)
    cfg = TrainConfig(data=str(corpus_file), out_dir=str(tmp_path / "r"), seq_len=16, batch_size=4, steps=4,
                      eval_every=2, sample_tokens=0, plot=False, threads=1, device="cpu")
    trainer = Trainer(TINY, cfg)
    calls = []
    trainer.model.register_forward_hook(lambda *a: calls.append(1))
    trainer.run()
    assert len(trainer.history["val"]) == 2
    assert not (tmp_path / "r" / "loss.png").exists()
    assert len(calls) == 4 + 2  # four training steps and two one-call evaluations: no sampling
    with pytest.raises(AssertionError, match="plotted"):  # and the plot is really made when on
        Trainer(TINY, TrainConfig(**dict(cfg.__dict__, plot=True, steps=2)), force=True).run()


def test_cli_word_run_reports_unk_and_perplexity_and_ties_explicitly(tmp_path):
    data = tmp_path / "words.txt"
    data.write_text(word_corpus() + "zebra yak\n")
    common = ("--tokenizer", "word", "--hidden", "16", "--layers", "1", "--seq-len", "8", "--batch-size", "4",
              "--steps", "2", "--eval-every", "epoch", "--sample-tokens", "0", "--no-plot", "--device", "cpu")
    result = invoke("train", data, "--out", tmp_path / "r", *common)
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())  # rich wraps long lines
    assert "embedding 16 tied to the decoder" in out
    assert "<unk> (outside the vocabulary): 0 of" in out and ", 2 of" in out
    assert "perplexity" in out.split("done:")[1]
    result = invoke("train", data, "--out", tmp_path / "u", "--no-tie", *common)
    assert "embedding 16 separate from the decoder" in " ".join(result.stdout.split())
    one_line_error(invoke("train", data, "--out", tmp_path / "t", "--tie", "--embedding", "8", *common),
                   "--tie: the decoder can share the embedding only when --embedding is 0 or equals --hidden")
    one_line_error(invoke("train", data, "--out", tmp_path / "e", *common, "--eval-every", "often"),
                   "--eval-every: 'often' is neither a positive number of steps nor 'epoch'")
    one_line_error(invoke("train", data, "--out", tmp_path / "v", "--val-file", data, "--val-fraction", "0.2", *common),
                   "give either --val-fraction or --val-file, not both")
    assert not any((tmp_path / d).exists() for d in "tev")


def test_score_counts_unknown_words(tmp_path):
    from rnngen.model.runtime import RnnModel
    from rnngen.scoring import score_file
    from conftest import write_model

    tok = WordTokenizer.from_text("the cat sat\n")
    model = write_model(tmp_path / "w.onnx", ModelConfig(cell="gru", vocab_size=tok.vocab_size, hidden_size=8, num_layers=1), tok)
    text = tmp_path / "t.txt"
    text.write_text("the dog sat\nthe cat flew")
    result = score_file(RnnModel.load(model, device="cpu"), text)
    assert result.tokens == 8 and result.unknown_tokens == 2  # 6 words and two <eos>
    out = invoke("score", model, text, "--device", "cpu")
    assert out.exit_code == 0 and "2 tokens outside the vocabulary (25.00%)" in out.stdout
    assert math.isfinite(result.perplexity)
