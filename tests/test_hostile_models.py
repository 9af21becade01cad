"""Model files from strangers: every hostile file is refused with one line, through the API and the CLI.

The corpus (tests/hostile_corpus.py) is made from a small valid model; what each refusal
costs in time and memory is measured by benchmarks/hostile_models.py, not here.
"""

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from rnngen.cli import create_app
from rnngen.model.config import ModelConfig
from rnngen.errors import ModelFormatError
from rnngen.model.file import make_metadata, read_model_file
from rnngen.model.loop_graph import build_model
from rnngen.model.runtime import RnnModel, full_proto
from rnngen.serving.service import ServedModel
from rnngen.model.tokenizers import CharTokenizer

import hostile_corpus
from conftest import corpus_text, random_weights, write_model

runner = CliRunner()
app = create_app()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    tokenizer = CharTokenizer.from_text(corpus_text(1))
    valid = write_model(root / "valid.onnx", ModelConfig(cell="lstm", vocab_size=tokenizer.vocab_size,
                                                         hidden_size=16, num_layers=2), tokenizer)
    return valid, {case.name: case for case in hostile_corpus.build_corpus(valid, root / "cases")}


CASE_NAMES = [
    "loop trip count 2**62 (top level)", "loop trip count 2**62 (inside a layer's body)",
    "ConstantOfShape of 2**38 floats", "ConstantOfShape sized by the input length",
    "1,000,000 empty nodes (2 MB)", "6,000 empty nodes inside a Loop body",
    "metadata JSON nested 20,000 deep", "metadata entry of 1 MB", "config is a JSON list",
    "config hidden_size is a string", "training val_loss is a string", "training is a JSON list",
    "tokenizer is a JSON string", "state is a number", "val_loss is NaN", "vocabulary with a lone surrogate",
    "word vocabulary symbol with a space", "custom-domain op in a model-local function",
    "decoder bias larger than the vocabulary", "weight dims claiming 10**12 values",
    "weight of 16 MB against a tiny config", "external data: symbolic link to a file outside",
    "external data: symbolic-linked subfolder", "external data: symbolic link inside the folder",
]


def test_the_corpus_has_every_case_and_its_source_loads(corpus):
    valid, cases = corpus
    assert sorted(cases) == sorted(CASE_NAMES)
    RnnModel.load(valid, device="cpu")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_api_refuses_with_one_line(corpus, name):
    case = corpus[1][name]
    with pytest.raises(ModelFormatError) as err:
        RnnModel.load(case.path, device="cpu")
    message = str(err.value)
    assert case.needle in message
    assert "\n" not in message and message.startswith(str(case.path))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_info_refuses_with_one_line(corpus, name):
    case = corpus[1][name]
    result = runner.invoke(app, ["info", str(case.path)])
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1 and case.needle in result.stderr


@pytest.mark.parametrize("command", [
    ["generate", "--model", "{model}", "-n", "5"],
    ["score", "{model}", "{text}"],
    ["inspect", "{text}", "--model", "{model}", "--json"],
    ["serve", "--model", "{model}", "--port", "0"],
])
@pytest.mark.parametrize("name", ["loop trip count 2**62 (inside a layer's body)", "metadata JSON nested 20,000 deep",
                                  "vocabulary with a lone surrogate"])
def test_every_command_refuses_at_start(corpus, tmp_path, command, name):
    case = corpus[1][name]
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox\n")
    result = runner.invoke(app, [a.format(model=case.path, text=text) for a in command],
                           env={"RNNGEN_SESSION_SECRET": "s" * 32})  # serve says nothing about a missing secret
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output + result.stderr
    assert result.stderr.startswith("error:") and case.needle in result.stderr
    assert "\n" not in result.stderr.strip()


def test_model_file_symlinked_from_another_folder_reads_its_own_folders_data(corpus, tmp_path):
    """rnngen checks and reads external data in the real file's folder: what is checked is what runs."""
    valid, _ = corpus
    vocab = read_model_file(valid).config.vocab_size
    real = hostile_corpus.external_bias(valid, tmp_path / "real", "w.bin", np.full(vocab, 3.0))
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "w.bin").write_bytes(np.full(vocab, -3.0, np.float32).tobytes())  # never read
    (tmp_path / "link" / "model.onnx").symlink_to(real)
    bias = next(t for t in full_proto(read_model_file(tmp_path / "link" / "model.onnx")).graph.initializer
                if t.name == "decoder_b")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(bias), np.full(vocab, 3.0, np.float32))


def test_what_runs_is_rebuilt_not_the_files_bytes(corpus):
    """The session's graph carries only rnngen's nodes and the file's weights, whatever else the file held."""
    valid, _ = corpus
    model = onnx.ModelProto.FromString(valid.read_bytes())
    model.doc_string = "anything"
    model.graph.doc_string = "anything"
    plain = read_model_file(valid)
    with_docs = valid.with_name("docs.onnx")
    with_docs.write_bytes(model.SerializeToString())
    loaded = read_model_file(with_docs)
    assert loaded.model_bytes == plain.model_bytes  # doc strings dropped: the same graph, the same bytes


def test_shipped_exporter_output_passes_for_every_cell_and_shape(tmp_path, cell):
    """Whatever the exporter builds is rnngen's graph: folded and unfolded embeddings, tied or not, 1 to 3 layers."""
    tok = CharTokenizer(list("abcdefgh"))
    for config in (ModelConfig(cell=cell, vocab_size=8, hidden_size=4, num_layers=1),
                   ModelConfig(cell=cell, vocab_size=8, hidden_size=6, num_layers=3, embedding_size=3, tie_weights=False)):
        path = tmp_path / f"{cell}{config.num_layers}.onnx"
        path.write_bytes(build_model(config, random_weights(config), make_metadata(config, tok, {})).SerializeToString())
        rnn = RnnModel.load(path, device="cpu")
        logits, _ = rnn.run(np.array([[1, 2, 3]]), rnn.initial_state(1))
        assert logits.shape == (1, 3, 8)


def test_training_metadata_a_newer_rnngen_may_write_still_lists(tmp_path, char_tokenizer):
    """Unknown plain fields and nulls are fine; ListModels' description of the model never fails."""
    config = ModelConfig(cell="gru", vocab_size=char_tokenizer.vocab_size, hidden_size=8, num_layers=1)
    path = write_model(tmp_path / "m.onnx", config, char_tokenizer,
                       training={"val_loss": None, "corpus": None, "new_field": "x", "epochs": 3})
    info = ServedModel("m", RnnModel.load(path, device="cpu"), scheduler=None).to_pb()
    assert info.name == "m" and not info.HasField("val_loss")
    assert json.loads(read_model_file(path).metadata["rnngen.training"])["new_field"] == "x"


def test_file_size_limit(corpus, monkeypatch):
    import rnngen.model.file as modelfile

    valid, _ = corpus
    monkeypatch.setattr(modelfile, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ModelFormatError, match="a model file may hold at most 1,000"):
        read_model_file(valid)
