"""Training: the loss falls, resume is exact, bad input and NaN losses stop cleanly."""

import json
import math

import pytest

torch = pytest.importorskip("torch")

from rnngen.model.config import ModelConfig  # noqa: E402
from rnngen.errors import DataError, InvalidParameterError, OverwriteRefusedError, TrainingDivergedError  # noqa: E402
from rnngen.training.checkpoint import load_checkpoint  # noqa: E402
from rnngen.training.trainer import TrainConfig, Trainer, learning_rate  # noqa: E402

TINY = ModelConfig(cell="lstm", hidden_size=24, num_layers=2, dropout=0.1)


def config(corpus_file, out, **kw):
    base = dict(data=str(corpus_file), out_dir=str(out), seq_len=16, batch_size=4, steps=12,
                eval_every=4, sample_tokens=20, warmup_steps=2, lr=1e-2, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_on_a_tiny_corpus(corpus_file, tmp_path, cell):
    trainer = Trainer(ModelConfig(cell=cell, hidden_size=32, num_layers=1), config(corpus_file, tmp_path / "r", steps=60, eval_every=30))
    trainer.run()
    losses = [v for _, v in trainer.history["train"]]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    vals = [v for _, v in trainer.history["val"]]
    assert vals[-1] < math.log(trainer.tokenizer.vocab_size) - 0.5  # better than uniform guessing
    assert (tmp_path / "r" / "loss.png").stat().st_size > 1000
    for name in ("last", "best"):
        meta = json.loads((tmp_path / "r" / f"{name}.json").read_text())
        assert meta["format"] == "rnngen-checkpoint" and meta["step"] == 60
        assert (tmp_path / "r" / f"{name}.safetensors").exists()


def test_interrupted_and_resumed_run_follows_the_same_curve(corpus_file, tmp_path):
    straight = Trainer(TINY, config(corpus_file, tmp_path / "a"))
    straight.run()

    first = Trainer(TINY, config(corpus_file, tmp_path / "b"))

    def stop_at_7(report):
        if report.step == 7:  # mid-epoch and between evaluations: like a Ctrl-C
            first.request_stop()
    first.on_step = stop_at_7
    first.run()
    assert first.step == 7
    assert load_checkpoint(tmp_path / "b" / "last.json").meta["step"] == 7

    resumed = Trainer(TINY, config(corpus_file, tmp_path / "b"), resume_from=tmp_path / "b" / "last.json")
    assert resumed.step == 7
    resumed.run()
    assert resumed.history["train"] == straight.history["train"]  # bit for bit
    assert resumed.history["val"] == straight.history["val"]
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_checkpoint_is_data_not_pickle(corpus_file, tmp_path):
    Trainer(TINY, config(corpus_file, tmp_path / "r", steps=4)).run()
    raw = (tmp_path / "r" / "last.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    assert {"model.embedding.weight", "rng.torch", "carry.h", "carry.c"} <= set(header)
    assert any(k.startswith("optim.") for k in header)
    meta = json.loads((tmp_path / "r" / "last.json").read_text())
    assert set(meta) >= {"model", "tokenizer", "train", "step", "history", "param_groups", "corpus"}


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus_file, tmp_path):
    trainer = Trainer(TINY, config(corpus_file, tmp_path / "r", steps=12, eval_every=4))

    def poison(report):
        if report.step == 6:
            with torch.no_grad():
                trainer.model.decoder.bias.fill_(float("nan"))
    trainer.on_step = poison
    good = None
    with pytest.raises(TrainingDivergedError, match="loss became nan at step 7") as err:
        trainer.on_eval = lambda r: None
        orig = trainer._evaluate_and_save

        def remember(rng):
            nonlocal good
            orig(rng)
            good = (tmp_path / "r" / "last.safetensors").read_bytes()
        trainer._evaluate_and_save = remember
        trainer.run()
    assert "kept" in str(err.value)
    assert load_checkpoint(tmp_path / "r").meta["step"] == 4
    assert (tmp_path / "r" / "last.safetensors").read_bytes() == good
    assert all(math.isfinite(t.float().sum().item()) for k, t in load_checkpoint(tmp_path / "r" / "last.json").tensors.items() if k.startswith("model."))


def test_existing_run_directory_is_not_overwritten_without_force(corpus_file, tmp_path):
    run = tmp_path / "r"
    Trainer(TINY, config(corpus_file, run, steps=4)).run()
    before = (run / "last.safetensors").read_bytes()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(OverwriteRefusedError, match="--force"):
        Trainer(TINY, config(corpus_file, run, steps=4, seed=5))
    assert (run / "last.safetensors").read_bytes() == before
    Trainer(TINY, config(corpus_file, run, steps=4, seed=5), force=True).run()
    assert (run / "last.safetensors").read_bytes() != before
    assert (run / "notes.txt").read_text() == "mine"  # --force replaces checkpoints only


@pytest.mark.parametrize("content,needle", [
    (None, "data file not found"),
    (b"", "data file is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks binary (NUL byte at offset 8)"),
    (b"caf\xe9 au lait" * 100, "not UTF-8 text (invalid byte at offset 3)"),
    (b"too short\n", "corpus too short"),
])
def test_bad_corpus_is_one_clear_error(tmp_path, content, needle):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as err:
        Trainer(TINY, config(path, tmp_path / "r"))
    assert needle in str(err.value)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("field,value,needle", [
    ("seq_len", 0, "seq_len: 0 is outside [1, 100000]"),
    ("batch_size", -1, "batch_size: -1"),
    ("lr", 0.0, "lr: 0.0 is outside (0, 10]"),
    ("lr", float("nan"), "lr: nan is not a number in (0, 10]"),
    ("val_fraction", 0.95, "val_fraction: 0.95 is outside (0, 0.9]"),
])
def test_invalid_training_settings(tmp_path, field, value, needle):
    with pytest.raises(InvalidParameterError) as err:
        TrainConfig(data="x", out_dir=str(tmp_path), **{field: value})
    assert needle in str(err.value)


def test_unknown_tokenizer_kind_is_refused_before_the_corpus_is_read(tmp_path):
    # The kinds come from the caller (the CLI passes the plugins'); the built-ins by default.
    cfg = TrainConfig(data=str(tmp_path / "absent.txt"), out_dir=str(tmp_path), tokenizer="bpe")
    with pytest.raises(InvalidParameterError, match="tokenizer: 'bpe' is not one of byte, char, word"):
        Trainer(ModelConfig(), cfg)


def test_learning_rate_warms_up_then_decays():
    cfg = TrainConfig(data="x", out_dir="y", lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.55)
    assert learning_rate(110, cfg) == pytest.approx(0.1)
    rates = [learning_rate(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_word_and_byte_models_train(corpus_file, tmp_path):
    for kind in ("word", "byte"):
        trainer = Trainer(ModelConfig(cell="gru", hidden_size=16, num_layers=1),
                          config(corpus_file, tmp_path / kind, tokenizer=kind, steps=4, seq_len=8, max_vocab=20))
        trainer.run()
        assert trainer.tokenizer.kind == kind
        assert trainer.model.config.vocab_size == (20 if kind == "word" else 256)
