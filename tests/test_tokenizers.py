import pytest

from rnngen.errors import InvalidParameterError, TokenizerError
from rnngen.model.tokenizers import ByteTokenizer, CharTokenizer, WordTokenizer, build_tokenizer, tokenizer_from_dict

UNICODE_TEXT = "naïve café — 東京 🙂 ĉu\n"


def test_char_round_trip_with_unicode():
    tok = CharTokenizer.from_text(UNICODE_TEXT)
    ids = tok.encode(UNICODE_TEXT)
    assert len(ids) == len(UNICODE_TEXT)
    assert tok.decode(ids) == UNICODE_TEXT
    assert tok.symbols == sorted(set(UNICODE_TEXT))


def test_char_unknown_characters_error_names_them():
    tok = CharTokenizer.from_text("abc ")
    with pytest.raises(TokenizerError) as err:
        tok.encode("abz é")
    message = str(err.value)
    assert "'z' (U+007A LATIN SMALL LETTER Z)" in message
    assert "U+00E9" in message
    assert "--unknown replace" in message


def test_char_unknown_replace_and_skip():
    tok = CharTokenizer.from_text("abc ")
    assert tok.decode(tok.encode("azb", on_unknown="replace")) == "a b"
    assert tok.decode(tok.encode("azb", on_unknown="skip")) == "ab"
    no_space = CharTokenizer.from_text("xyz")
    assert no_space.decode(no_space.encode("xqy", on_unknown="replace")) == "xxy"
    with pytest.raises(InvalidParameterError, match="on_unknown"):
        tok.encode("a", on_unknown="ignore")


def test_byte_round_trip_any_utf8():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE_TEXT)
    assert len(ids) == len(UNICODE_TEXT.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == UNICODE_TEXT


def test_byte_stream_never_cuts_a_character():
    tok = ByteTokenizer()
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in tok.encode("é東🙂")]
    pieces.append(decoder.flush())
    # Each multi-byte character shows up whole, on its last byte; nothing before is half of it.
    assert pieces == ["", "é", "", "", "東", "", "", "", "🙂", ""]


def test_byte_stream_invalid_bytes_become_replacement_not_crash():
    decoder = ByteTokenizer().stream_decoder()
    out = "".join(decoder.push(i) for i in [0x61, 0xFF, 0xE6]) + decoder.flush()
    assert out == "a\ufffd\ufffd"


def test_word_tokenizer_caps_vocabulary_and_maps_unknowns():
    text = "the cat sat\nthe dog sat\nthe cat ran\n"
    tok = WordTokenizer.from_text(text, max_vocab=5)
    assert tok.symbols[:2] == ["<unk>", "<eos>"]
    assert tok.vocab_size == 5
    assert tok.symbols[2:] == ["the", "cat", "sat"]  # by frequency, ties alphabetical
    ids = tok.encode("the cat flew\n")
    assert tok.decode(ids) == "the cat <unk>\n"


def test_word_tokenizer_treats_literal_unk_as_unknown_token():
    tok = WordTokenizer.from_text("a <unk> b\n", max_vocab=100)
    assert tok.symbols.count("<unk>") == 1
    assert tok.encode("<unk>") == [0]


@pytest.mark.parametrize("kind", ["char", "byte", "word"])
def test_tokenizer_travels_as_plain_data(kind):
    tok = build_tokenizer(kind, "hello world\nhello there\n")
    again = tokenizer_from_dict(tok.to_dict())
    assert again.kind == kind
    assert again.vocab_size == tok.vocab_size
    assert again.encode("hello world\n") == tok.encode("hello world\n")


def test_tokenizer_from_bad_data_is_a_clear_error():
    with pytest.raises(TokenizerError, match="kind"):
        tokenizer_from_dict({"kind": "sentencepiece"})
    with pytest.raises(TokenizerError, match="list of string symbols"):
        tokenizer_from_dict({"kind": "char", "symbols": "abc"})
    with pytest.raises(InvalidParameterError, match="tokenizer"):
        build_tokenizer("bpe", "x")



@pytest.mark.parametrize("kind", ["char", "byte", "word"])
def test_a_run_of_tokens_decodes_in_one_call_as_pushed_one_by_one(kind):
    """push_tokens (push_many where a decoder has it) gives the text and leaves the decoder's
    unfinished state as a push per token would, with runs that split a character; a decoder with
    push only (a plugin's) is pushed token by token."""
    from rnngen.model.tokenizers import push_tokens

    text = "abc é a\nbc é"
    tokenizer = build_tokenizer(kind, text)
    ids = tokenizer.encode(text)
    one, runs = tokenizer.stream_decoder(), tokenizer.stream_decoder()
    want = [one.push(t) for t in ids]
    got, unfinished = [], []
    for a, b in zip(range(0, len(ids), 5), range(5, len(ids) + 5, 5)):
        got.append(push_tokens(runs, ids[a:b]))
        unfinished.append(runs.save())
    assert "".join(got) == "".join(want)
    assert runs.save() == one.save() and runs.flush() == one.flush()
    if kind == "byte":  # some run ended inside the two bytes of an é
        assert any(unfinished)

    class PushOnly:
        def __init__(self):
            self.pushed = []

        def push(self, token_id):
            self.pushed.append(token_id)
            return str(token_id)

    plugin = PushOnly()
    assert push_tokens(plugin, [3, 1, 2]) == "312" and plugin.pushed == [3, 1, 2]
