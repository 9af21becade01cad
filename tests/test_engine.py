"""The decoding engine: processors by hand, batch invariance, rows joining, leaving, copied and reordered."""

import numpy as np
import pytest

from rnngen.decoding.engine import WINDOW, BatchState, DecodeEngine
from rnngen.decoding.rows import Row, row_generator
from rnngen.decoding.generation import generate
from rnngen.decoding.logits import RowParams, apply_penalties, banned_by_ngrams, draw, filtered_weights
from rnngen.model.runtime import RnnModel
from rnngen.model.slots import HostSlots
from rnngen.decoding.params import GenerationParams


def rp(**kw):
    return RowParams.from_params([GenerationParams(**kw)])


def filtered_probs(logits, params):
    """The filters' probabilities: each row's weights over their sum."""
    weights = filtered_weights(logits, params)
    return weights / weights.sum(axis=1, keepdims=True)


def probs(logits, **kw):
    return filtered_probs(np.array([logits], dtype=np.float64), rp(**kw))[0]


def test_temperature_scales_logits():
    e = np.exp(np.array([1.0, 2.0, 3.0]) / 0.5)
    np.testing.assert_allclose(probs([1.0, 2.0, 3.0], temperature=0.5), e / e.sum())


def test_top_k_keeps_the_k_largest():
    e = np.exp([3.0, 2.0])
    np.testing.assert_allclose(probs([0.0, 3.0, 1.0, 2.0], temperature=1.0, top_k=2), [0, e[0] / e.sum(), 0, e[1] / e.sum()])


def test_top_p_keeps_smallest_set_reaching_p():
    base = np.log([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(probs(base, temperature=1.0, top_p=0.7), [0.625, 0.375, 0, 0], atol=1e-12)
    np.testing.assert_allclose(probs(base, temperature=1.0, top_p=0.81), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=1e-12)
    np.testing.assert_allclose(probs(base, temperature=1.0, top_p=0.1), [1, 0, 0, 0], atol=1e-12)


def test_min_p_drops_tokens_below_fraction_of_the_top():
    base = np.log([0.5, 0.3, 0.15, 0.05])
    # min_p 0.3: floor 0.15 keeps 0.5, 0.3, 0.15.
    np.testing.assert_allclose(probs(base, temperature=1.0, min_p=0.3), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=1e-12)


def test_filters_apply_in_order_k_then_p():
    base = np.log([0.4, 0.3, 0.2, 0.1])
    # top-k 3 → 4/9, 3/9, 2/9; top-p 0.7 keeps 4/9 + 3/9 = 7/9 ≥ 0.7.
    np.testing.assert_allclose(probs(base, temperature=1.0, top_k=3, top_p=0.7), [4 / 7, 3 / 7, 0, 0], atol=1e-12)


def test_repetition_presence_frequency_penalties_by_hand():
    logits = np.array([[2.0, -1.0, 0.5, 1.0]])
    seen = np.array([[True, True, False, False]])
    got = apply_penalties(logits.copy(), rp(repetition_penalty=2.0), seen, None)  # in place: a copy each
    np.testing.assert_allclose(got, [[1.0, -2.0, 0.5, 1.0]])  # positive halved, negative doubled, unseen untouched
    edge = np.array([[0.0, -np.inf, 3.0, -0.5]])  # zero stays zero, -inf stays -inf
    got = apply_penalties(edge.copy(), rp(repetition_penalty=1.5), np.array([[True, True, True, False]]), None)
    np.testing.assert_allclose(got, [[0.0, -np.inf, 2.0, -0.5]])
    got = apply_penalties(edge.copy(), rp(repetition_penalty=0.5), np.array([[True, True, True, True]]), None)
    np.testing.assert_allclose(got, [[0.0, -np.inf, 6.0, -0.25]])  # a penalty below 1 favours seen tokens
    counts = np.array([[0, 3, 1, 0]])
    got = apply_penalties(logits.copy(), rp(presence_penalty=0.5, frequency_penalty=0.25), None, counts)
    np.testing.assert_allclose(got, [[2.0, -1.0 - 0.5 - 0.75, 0.5 - 0.5 - 0.25, 1.0]])


def test_no_repeat_ngram_bans_completions():
    history = [1, 2, 3, 1, 2]
    assert banned_by_ngrams(history, 3) == [3]  # (1, 2) was followed by 3
    assert sorted(banned_by_ngrams(history, 2)) == [3]  # (2,) was followed by 3
    assert sorted(banned_by_ngrams(history, 1)) == [1, 1, 2, 2, 3]
    assert banned_by_ngrams(history, 0) == []


def reference_filtered_probs(x, temperature, top_k, top_p, min_p):
    """Steps 4-7 for one row, written plainly (the order and tie rules of rnngen.decoding.logits)."""
    x = np.asarray(x, dtype=np.float64) / (temperature or 1.0)
    if 0 < top_k < len(x):
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x >= kth, x, -np.inf)  # ties with the k-th largest stay
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1.0:
        ranked = np.sort(p)[::-1]
        before = np.cumsum(ranked) - ranked
        floor = ranked[(before < top_p).sum() - 1]
        p = np.where(p >= floor, p, 0.0)
        p /= p.sum()
    if min_p > 0.0:
        p = np.where(p >= min_p * p.max(), p, 0.0)
        p /= p.sum()
    return p


def test_filters_agree_with_a_plain_per_row_reference_in_mixed_batches():
    """Rows with their own k, p, min-p and temperature in one batch, logits with ties and -inf
    (banned tokens): the batched filters keep exactly the reference's tokens, with its probabilities."""
    gen = np.random.default_rng(7)
    for trial in range(200):
        rows, vocab = int(gen.integers(1, 30)), int(gen.integers(2, 70))
        x = gen.normal(0, 2, (rows, vocab))
        if trial % 3 == 0:
            x = np.round(x)  # ties, at the k-th largest too
        if trial % 4 == 0:
            x[:, : vocab // 4] = -np.inf
        x[:, -1] = np.maximum(x[:, -1], 0.0)  # at least one finite logit per row
        params = [GenerationParams(temperature=float(gen.choice([0.0, 0.6, 1.0, 1.7])),
                                   top_k=int(gen.choice([0, 1, 3, 10, vocab - 1, vocab + 2])) if trial % 5 else 0,
                                   top_p=float(gen.choice([1.0, 0.3, 0.9])), min_p=float(gen.choice([0.0, 0.0, 0.2])))
                  for _ in range(rows)]
        got = filtered_probs(x.copy(), RowParams.from_params(params))
        for i, p in enumerate(params):
            want = reference_filtered_probs(x[i], p.temperature, p.top_k, p.top_p, p.min_p)
            np.testing.assert_array_equal(got[i] > 0, want > 0)
            np.testing.assert_allclose(got[i], want, rtol=1e-12, atol=1e-15)


def test_draw_is_inverse_cdf():
    p = np.array([[0.2, 0.0, 0.5, 0.3]] * 4)
    assert draw(p, np.array([0.0, 0.19, 0.2, 0.999])).tolist() == [0, 0, 2, 3]
    # Weights need not sum to 1, and the largest uniform below 1 still lands on a token with weight.
    w = np.array([[0.0, 3.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0]])
    assert draw(w, np.array([np.nextafter(1.0, 0.0)] * 2)).tolist() == [2, 0]
    assert draw(w, np.array([0.74, 0.5])).tolist() == [1, 0]


def test_top_p_sees_top_k_ties_past_the_widest_k():
    """Row 1 (k = 2) has ties with its 2nd largest past rank 3 = max(k): top-k keeps them, and top-p
    must count their mass (the ranks past max(k) are looked at only when a tie runs past them)."""
    x = np.array([[4.0, 3.0, 2.0, 1.0, 0.0], [2.0, 1.0, 1.0, 1.0, 0.0]])
    params = RowParams.from_params([GenerationParams(temperature=1.0, top_k=3, top_p=0.99),
                                    GenerationParams(temperature=1.0, top_k=2, top_p=0.5)])
    got = filtered_probs(x, params)
    e = np.exp([4.0, 3.0, 2.0])
    np.testing.assert_allclose(got[0], [*(e / e.sum()), 0, 0])
    # After top-k the largest has e/(e+3) = 0.48 < 0.5, so top-p keeps the tied ones too (with the
    # first three ranks alone it would be e/(e+2) = 0.58 and keep only the largest).
    e = np.exp([2.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(got[1], [*(e / e.sum()), 0])


def test_per_row_parameters_in_one_batch():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2))
    params = RowParams.from_params([GenerationParams(temperature=1.0, top_k=1), GenerationParams(temperature=1.0, top_p=0.7)])
    got = filtered_probs(logits, params)
    np.testing.assert_allclose(got, [[1, 0, 0, 0], [0.625, 0.375, 0, 0]], atol=1e-12)


@pytest.fixture
def rnn(char_model_file):
    return RnnModel.load(char_model_file, device="cpu")


def alone(rnn, prompt, params):
    return generate(rnn, prompt, params).text


def make_row(rnn, prompt_ids, params, tag):
    return Row.start(params, row_generator(params.seed, 0), rnn.tokenizer, list(prompt_ids), tag=tag)


def run_to_end(engine):
    while len(engine):
        engine.step()


def test_a_row_decodes_the_same_alone_or_among_32_others(rnn):
    tok = rnn.tokenizer
    target = GenerationParams(max_new_tokens=60, seed=42, temperature=0.9, top_k=10, repetition_penalty=1.2)
    expected = alone(rnn, "to be", target)
    engine = DecodeEngine(rnn)
    rows = []
    gen = np.random.default_rng(0)
    for i in range(33):
        prompt = "to be" if i == 16 else "the " * int(gen.integers(1, 4))
        params = target if i == 16 else GenerationParams(
            max_new_tokens=int(gen.integers(5, 80)), seed=i, temperature=float(gen.choice([0.0, 0.7, 1.3])),
            top_p=float(gen.choice([1.0, 0.8])), presence_penalty=float(gen.choice([0.0, 0.5])),
            no_repeat_ngram_size=int(gen.choice([0, 3])), stop=("e.",) if i % 5 == 0 else ())
        ids = tok.encode(prompt)
        logits, state = engine.prefill(ids)
        row = make_row(rnn, ids, params, i)
        engine.add([row], logits, state)
        rows.append(row)
    run_to_end(engine)
    assert rows[16].text == expected
    assert all(r.finish_reason in ("length", "stop") for r in rows)


def test_rows_joining_at_other_steps_end_at_their_own_limits_with_all_their_unread_text(rnn):
    """Temperature-only rows (the step's cheapest path, where the length and unread-text checks are
    counted down): each ends after exactly its max_new_tokens, and text nobody read for longer than
    the token ring holds is still all there, as each row decodes it alone."""
    from rnngen.decoding.rows import HISTORY_WINDOW

    tok = rnn.tokenizer
    limits = [7, 3 * HISTORY_WINDOW, 40, 3, HISTORY_WINDOW // 2 + 5, 90]
    params = [GenerationParams(max_new_tokens=n, seed=i, temperature=0.9) for i, n in enumerate(limits)]
    engine = DecodeEngine(rnn)
    rows = []
    for i, p in enumerate(params):
        ids = tok.encode("the " * (i + 1))
        row = make_row(rnn, ids, p, i)
        engine.add([row], *engine.prefill(ids))
        rows.append(row)
        for _ in range(i * 2):  # the others step on before the next row joins (updates never read)
            engine.step()
    run_to_end(engine)
    for i, (row, p) in enumerate(zip(rows, params)):
        assert row.finish_reason == "length" and row.count == p.max_new_tokens
        assert row.text == alone(rnn, "the " * (i + 1), p)


def test_a_row_whose_processor_fails_ends_with_the_tokens_it_got_and_the_others_go_on(rnn):
    """A failing processor ends its own row at that step, with no token for it; its neighbours'
    counts and texts are as if it had not been there."""
    tok = rnn.tokenizer
    fine = GenerationParams(max_new_tokens=30, seed=1, temperature=0.9)
    failing = GenerationParams(max_new_tokens=30, seed=2, processors=("only:xyz", "ban:xyz"))  # nothing left to choose
    engine = DecodeEngine(rnn)
    ids = tok.encode("the ")
    rows = [make_row(rnn, ids, fine, 0)]
    engine.add(rows, *engine.prefill(ids))
    for _ in range(5):
        engine.step()
    rows.append(make_row(rnn, ids, failing, 1))
    engine.add(rows[1:], *engine.prefill(ids))
    run_to_end(engine)
    assert rows[1].finish_reason == "error" and "no token is left" in str(rows[1].error)
    assert rows[1].count == 0 and rows[1].text == ""
    assert rows[0].finish_reason == "length" and rows[0].count == 30
    assert rows[0].text == alone(rnn, "the ", fine)


def test_rows_join_leave_copy_and_reorder_between_steps(rnn):
    tok = rnn.tokenizer
    pa = GenerationParams(max_new_tokens=50, seed=1)
    pb = GenerationParams(max_new_tokens=50, seed=2, temperature=1.2)
    pc = GenerationParams(max_new_tokens=30, seed=3, temperature=0)
    want_a, want_b, want_c = alone(rnn, "the", pa), alone(rnn, "a s", pb), alone(rnn, "to", pc)

    engine = DecodeEngine(rnn)
    a = make_row(rnn, tok.encode("the"), pa, "a")
    engine.add([a], *engine.prefill(tok.encode("the")))
    for _ in range(10):
        engine.step()
    b = make_row(rnn, tok.encode("a s"), pb, "b")  # joins while a is running
    engine.add([b], *engine.prefill(tok.encode("a s")))
    for _ in range(5):
        engine.step()
    engine.select([1, 0])  # reorder
    assert [r.tag for r in engine.rows] == ["b", "a"]
    c = make_row(rnn, tok.encode("to"), pc, "c")
    engine.add([c], *engine.prefill(tok.encode("to")))
    for _ in range(3):
        engine.step()
    copy_of_a = a.clone(tag="a2")
    engine.select([0, 1, 1, 2], rows=[engine.rows[0], engine.rows[1], copy_of_a, engine.rows[2]])  # copy a
    engine.step()
    engine.remove(b)  # b leaves (a cancelled stream); the others go on untouched
    assert b.finish_reason == "cancelled"
    run_to_end(engine)
    assert a.text == want_a and c.text == want_c
    assert want_b.startswith(b.text) and len(b.text) < len(want_b)
    # The copy continued from a's state with a copy of a's random generator: the same continuation.
    assert copy_of_a.text == want_a


def test_batch_state_select_and_concat():
    arrays = {"h": np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)}
    state = BatchState(arrays)
    picked = state.select([2, 0, 0])
    np.testing.assert_array_equal(picked.arrays["h"][:, 0], arrays["h"][:, 2])
    np.testing.assert_array_equal(picked.arrays["h"][:, 2], arrays["h"][:, 0])
    assert BatchState.concat([state, picked]).size == 6


def test_the_same_row_object_twice_is_refused(rnn):
    engine = DecodeEngine(rnn)
    row = make_row(rnn, [1], GenerationParams(seed=0), "x")
    engine.add([row], *engine.prefill([1]))
    with pytest.raises(ValueError, match="clone"):
        engine.select([0, 0])


class RecordingStore(HostSlots):
    """The host store, noting how many rows each call moves between the engine and the store."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = []

    def write_rows(self, slots, state, temperature=None):
        self.calls.append(("write_rows", len(slots)))
        super().write_rows(slots, state, temperature)

    def free(self, slots):
        self.calls.append(("free", len(slots)))
        super().free(slots)

    def gather(self, order):
        self.calls.append(("gather", len(order)))
        super().gather(order)

    def read_rows(self, slots):
        self.calls.append(("read_rows", len(slots)))
        return super().read_rows(slots)


def test_a_joining_or_leaving_row_moves_only_its_own_state(rnn):
    """Join writes the new row's state into a free slot, leave frees it: nothing about the other rows moves."""
    tok = rnn.tokenizer
    store = RecordingStore(rnn)
    engine = DecodeEngine(rnn, store=store)
    params = GenerationParams(max_new_tokens=1000, seed=1, temperature=0.9)
    logits, state = engine.prefill(tok.encode("the"))
    rows = [make_row(rnn, tok.encode("the"), params, i) for i in range(8)]
    engine.add(rows, logits[[0] * 8], state.select([0] * 8))
    engine.step()
    store.calls.clear()
    engine.remove(rows[3])
    late = make_row(rnn, tok.encode("to"), params, "late")
    engine.add([late], *engine.prefill(tok.encode("to")))
    for _ in range(3):
        engine.step()
    assert store.calls == [("free", 1), ("write_rows", 1)]
    assert late.slot == 3  # the freed slot, handed out again
    assert [r.tag for r in engine.rows] == [0, 1, 2, "late", 4, 5, 6, 7]


def test_slots_join_leave_and_gather_as_the_batch_gathers_did(rnn):
    """HostSlots against the old semantics (a batch of rows, changed by concatenate and select):
    rows join, leave, are copied and reordered between steps, and every row's state stays its own."""
    gen = np.random.default_rng(3)
    store = HostSlots(rnn)
    reference: dict[int, dict] = {}  # slot -> the row's state, stepped as a batch of its own
    names = rnn.state_names
    for step in range(12):
        if step % 3 == 0:  # two rows join
            state = {k: gen.normal(0, 0.5, v.shape).astype(np.float32) for k, v in rnn.initial_state(2).items()}
            slots = store.allocate(2)
            store.write_rows(slots, state)
            for j, slot in enumerate(slots.tolist()):
                reference[slot] = {k: state[k][:, j : j + 1] for k in names}
        if step % 4 == 1 and len(reference) > 1:  # one leaves
            gone = sorted(reference)[int(gen.integers(len(reference)))]
            store.free([gone])
            del reference[gone]
        if step % 5 == 4:  # copy one row and reverse the order, as BatchState.select would
            live = sorted(reference)
            order = [live[0]] + live[::-1]
            store.gather(order)
            reference = {i: reference[s] for i, s in enumerate(order)}
        rows = store.rows
        tokens = gen.integers(0, rnn.config.vocab_size, rows)
        store.step(tokens)
        for slot, state in reference.items():
            _, reference[slot] = rnn.step(tokens[slot : slot + 1], state)
        for slot, state in reference.items():
            got = store.read_rows([slot])
            for k in names:
                np.testing.assert_allclose(got[k], state[k], atol=1e-6)
    assert store.rows == max(reference) + 1


def test_a_reader_that_keeps_up_gets_each_tokens_own_text_in_its_update(rnn):
    """Iterating a step's updates (as the server does every step) gives each row the text of the
    token that step chose, and the row's text is their concatenation."""
    tok = rnn.tokenizer
    engine = DecodeEngine(rnn)
    rows = []
    for i in range(5):
        ids = tok.encode("to be ")
        rows.append(make_row(rnn, ids, GenerationParams(max_new_tokens=30 + i, seed=i, temperature=0.9), i))
        engine.add([rows[-1]], *engine.prefill(ids))
    pieces = {i: [] for i in range(5)}
    steps = 0
    while len(engine):
        updates = engine.step()
        steps += 1
        first = list(updates)
        for update in first:
            assert update.text == tok.decode([update.token])
            pieces[update.row.tag].append(update.text)
        assert all(a is b for a, b in zip(first, updates, strict=True))  # iterating again gives the same updates
    assert steps == 34
    for i, row in enumerate(rows):
        assert "".join(pieces[i]) == row.text and len(pieces[i]) == 30 + i


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_step_texts_read_in_bulk_are_the_updates_texts(kind, char_model_file, byte_model_file):
    """StepUpdates.texts() read right after each step (what a server does) gives each step the text
    that reading the updates one step late gives (the per-row path), and every row's texts add up
    to its tokens decoded: with a byte model's characters split across steps, a row with a stop
    string, rows joining and leaving, and one step read late on the bulk side too."""
    model = RnnModel.load(char_model_file if kind == "char" else byte_model_file, device="cpu")
    tok = model.tokenizer
    engines, rows = (DecodeEngine(model), DecodeEngine(model)), ([], [])
    seen, tokens = ({}, {}), {}  # tag -> texts read, on each side; tag -> tokens

    def join(tag, **kw):
        ids = tok.encode("to be é " if kind == "byte" else "to be ")
        params = GenerationParams(max_new_tokens=25, seed=tag, temperature=1.5, **kw)
        for engine, kept in zip(engines, rows):
            kept.append(make_row(model, ids, params, tag))
            engine.add([kept[-1]], *engine.prefill(ids))

    def read(updates, got, bulk):
        texts = updates.texts() if bulk else [u.text for u in updates]
        for row, token, text in zip(updates.rows, updates.tokens.tolist(), texts):
            got.setdefault(row.tag, []).append(text)
            if bulk:
                tokens.setdefault(row.tag, []).append(token)

    for tag in range(4):
        join(tag, stop=("ab", "e") if tag == 1 else ())
    behind, late = None, None
    while len(engines[0]) or len(engines[1]):
        step = engines[0]._steps
        if step == 5:
            join(10)
        if step == 7:
            for engine, kept in zip(engines, rows):
                engine.remove(next(r for r in kept if r.tag == 2))
        bulk, each = engines[0].step(), engines[1].step()
        if behind is not None:
            read(behind, seen[1], bulk=False)  # the step before, read after this one
        behind = each
        if step == 12:
            late = bulk
            continue
        if late is not None:
            read(late, seen[0], bulk=True)
            late = None
        read(bulk, seen[0], bulk=True)
    read(behind, seen[1], bulk=False)
    # Step by step the same text, but at the end: text a late reader had not read when its row
    # finished (or was removed) comes in the last update (or the Row).
    assert seen[0].keys() == seen[1].keys() and len(seen[0]) == 5
    assert all(seen[0][tag][:-2] == seen[1][tag][:-2] for tag in seen[0])
    for row in rows[0]:
        if row.tag == 2:  # removed: its last text went into its Row, not an update
            continue
        text = "".join(seen[0][row.tag])
        assert text == row.text
        full = tok.decode(tokens[row.tag])
        assert text == (full[: full.index("e")] if row.tag == 1 and "e" in full else full)


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_text_taken_now_and_then_is_the_text_read_from_every_update(kind, char_model_file, byte_model_file):
    """A reader that takes each step's `made` texts, its new rows' first tokens and one row's text at
    every step (`unread(rows)`), and everyone else's only now and then (`unread()`, at irregular
    gaps, once longer than the engine keeps unread text for) gets, row by row, the text and the
    token ids that reading every update gives: with a byte model's characters split across reads,
    a row with stop strings, rows joining and finishing at other steps."""
    model = RnnModel.load(char_model_file if kind == "char" else byte_model_file, device="cpu")
    tok = model.tokenizer
    every, sometimes = DecodeEngine(model), DecodeEngine(model)
    want = {}  # tag -> (texts, tokens) read from every update
    got = {}  # tag -> (texts, tokens) taken the other way
    gen = np.random.default_rng(4)

    def join(tag, max_new_tokens=60, **kw):
        ids = tok.encode("to be é " if kind == "byte" else "to be ")
        params = GenerationParams(max_new_tokens=max_new_tokens, seed=tag, temperature=1.5, **kw)
        for engine in (every, sometimes):
            engine.add([make_row(model, ids, params, tag)], *engine.prefill(ids))
        return [r for r in sometimes.rows if r.tag == tag]

    def take(table, tag, text, ids):
        texts, tokens = table.setdefault(tag, ([], []))
        texts.append(text)
        tokens.extend(ids)

    joined = [r for tag in range(4) for r in join(tag, stop=("ab", "e") if tag == 1 else ())]
    joined += join(5, max_new_tokens=WINDOW)  # unread for longer than half the window: the step makes it
    next_take = 3
    while len(every) or len(sometimes):
        step = every._steps
        if step == 9:
            joined += join(10)
        a, b = every.step(), sometimes.step()
        for u in a:
            take(want, u.row.tag, u.text, [u.token])
        for i, (text, ids) in b.made.items():
            take(got, b.rows[i].tag, text, ids)
        every_step = [row for row in b.rows if row.tag == 3]  # row 3: taken at every step
        for row, text, ids in sometimes.unread(joined + every_step):
            take(got, row.tag, text, ids)
        joined = []
        if step == next_take and step < 100 or step == WINDOW - 20:
            for row, text, ids in sometimes.unread():
                take(got, row.tag, text, ids)
            next_take = step + int(gen.integers(1, 9))
    assert got.keys() == want.keys() and len(got) == 6
    for tag, (texts, tokens) in want.items():
        assert "".join(got[tag][0]) == "".join(texts)
        assert got[tag][1] == tokens


def test_step_texts_after_skipped_steps_carry_the_unread_text(rnn):
    """A reader that skipped two steps' updates gets their text with the next step's (texts() then
    takes the per-row path), so nothing is lost."""
    tok = rnn.tokenizer
    engine = DecodeEngine(rnn)
    rows = [make_row(rnn, tok.encode("to "), GenerationParams(max_new_tokens=30, seed=i, temperature=0.9), i)
            for i in range(3)]
    logits, state = engine.prefill(tok.encode("to "))
    engine.add(rows, logits[[0] * 3], state.select([0] * 3))
    tokens = [[] for _ in rows]
    for step in range(3):
        updates = engine.step()
        for i, token in enumerate(updates.tokens.tolist()):
            tokens[i].append(token)
    texts = updates.texts()  # the first two steps were never read
    assert texts == [tok.decode(t) for t in tokens]


def test_a_reader_one_step_behind_still_gets_each_steps_own_text(rnn):
    """Updates read after the next step has run give the text of their own step, not the next one's."""
    tok = rnn.tokenizer
    engine = DecodeEngine(rnn)
    rows = []
    for i in range(3):
        ids = tok.encode("the ")
        rows.append(make_row(rnn, ids, GenerationParams(max_new_tokens=20, seed=i, temperature=0.9), i))
        engine.add([rows[-1]], *engine.prefill(ids))
    previous = engine.step()
    for _ in range(10):
        current = engine.step()
        for update in previous:
            assert update.text == tok.decode([update.token])
        previous = current


def test_host_slots_step_in_place_until_the_stepped_rows_change(rnn):
    """The step graph writes into arrays bound once: the same buffers step after step, made anew
    only when a row joins past the last stepped slot."""
    store = HostSlots(rnn)
    store.write_rows(store.allocate(3), rnn.initial_state(3), np.full(3, 0.8, np.float32))
    tokens = np.array([1, 2, 3])
    store.step(tokens, np.full(3, 0.5))
    first = store.read_logits()
    store.step(tokens, np.full(3, 0.5))
    assert np.shares_memory(first, store.read_logits())
    store.free([1])  # a hole below the last used slot: still three stepped rows
    store.step(tokens, np.full(3, 0.5))
    assert np.shares_memory(first, store.read_logits())
    store.write_rows(store.allocate(2), rnn.initial_state(2))  # slot 1 again, then slot 3: four rows
    assert store.rows == 4
    store.step(np.array([1, 2, 3, 4]), np.full(4, 0.5))
    assert not np.shares_memory(first, store.read_logits()) and store.read_logits().shape[0] == 4


def _store_with_random_rows(rnn, gen, n: int):
    """HostSlots holding n rows of random state, and each row's state (the reference to step alone)."""
    state = _random_state(rnn, gen, n)
    store = HostSlots(rnn)
    store.write_rows(store.allocate(n), state)
    return store, {i: {k: state[k][:, i : i + 1] for k in rnn.state_names} for i in range(n)}


def _random_state(rnn, gen, n: int) -> dict:
    return {k: gen.normal(0, 0.5, v.shape).astype(np.float32) for k, v in rnn.initial_state(n).items()}


def _step_with_references(rnn, store, reference: dict, gen) -> np.ndarray:
    """One store step with random tokens, each row's reference stepped alone; the store's logits."""
    tokens = gen.integers(0, rnn.config.vocab_size, store.rows)
    store.step(tokens)
    for slot in reference:
        _, reference[slot] = rnn.step(tokens[slot : slot + 1], reference[slot])
    return store.read_logits()


def _assert_rows_are_their_references(store, reference: dict) -> None:
    got = store.read_rows(sorted(reference))
    for j, slot in enumerate(sorted(reference)):
        for k, value in got.items():
            np.testing.assert_allclose(value[:, j : j + 1], reference[slot][k], atol=1e-5)


def test_host_slots_keep_their_arrays_while_the_top_rows_come_and_go_and_every_row_stays_its_own(rnn):
    """With 40 rows the arrays hold a few padding rows (an eighth of 32 at most): the top row leaving
    and a row joining there re-make nothing, and each row's state steps exactly as it would alone."""
    from rnngen.model.slots import bound_size

    assert [bound_size(n, 1 << 20) for n in (1, 15, 16, 17, 39, 40, 41, 1000)] == [1, 15, 16, 18, 40, 40, 44, 1024]
    gen = np.random.default_rng(5)
    store, reference = _store_with_random_rows(rnn, gen, 40)
    store.step(np.zeros(40, dtype=np.int64))
    first = store.read_logits()
    for i in range(40):
        _, reference[i] = rnn.step(np.zeros(1, dtype=np.int64), reference[i])
    store.free([39, 38])
    del reference[39], reference[38]
    joined = _random_state(rnn, gen, 1)
    store.write_rows(store.allocate(1), joined)  # slot 38
    reference[38] = joined
    assert store.rows == 39
    for _ in range(3):
        logits = _step_with_references(rnn, store, reference, gen)
        assert np.shares_memory(first, logits) and logits.shape[0] == 39
    _assert_rows_are_their_references(store, reference)


def test_host_slots_reuse_their_arrays_when_the_top_row_comes_and_goes_and_shrink_only_after_a_while(rnn):
    """A stream ending and the next joining move the top row across a size (32 rows: 32 arrays, 33: 36):
    the arrays grow at once, are not re-made when the rows go back and forth, and move to the smaller
    size only after the rows have fit it for SHRINK_AFTER_STEPS steps; each row steps as it would alone."""
    from rnngen.model.slots import SHRINK_AFTER_STEPS

    gen = np.random.default_rng(6)
    store, reference = _store_with_random_rows(rnn, gen, 32)

    def step():
        return _step_with_references(rnn, store, reference, gen)

    small = step()
    arrays = {id(small.base)}
    for _ in range(3):
        joined = _random_state(rnn, gen, 1)
        store.write_rows(store.allocate(1), joined)  # slot 32: a 33rd row
        reference[32] = joined
        large = step()
        arrays.add(id(large.base))
        store.free([32])
        del reference[32]
        assert np.shares_memory(step(), large)  # not shrunk yet
    assert len(arrays) == 2  # the 32-row arrays and the 36-row ones, each made once
    for _ in range(SHRINK_AFTER_STEPS - 2):
        assert step().base is not small.base  # still the larger arrays
    assert np.shares_memory(step(), small)  # the 32-row arrays again, reused
    _assert_rows_are_their_references(store, reference)


def test_host_slots_keep_the_arrays_of_every_size_they_left_within_their_budget(rnn, monkeypatch):
    """A burst of streams ramps the rows up through the same sizes each time: the arrays left at
    each size are kept (by size, within SPARE_BYTES) and bound again when the rows come back to it;
    over the budget the least recently left go first. Every row steps as it would alone."""
    import rnngen.model.slots as slots

    gen = np.random.default_rng(7)
    store, reference = _store_with_random_rows(rnn, gen, 4)

    def step():
        return _step_with_references(rnn, store, reference, gen).base

    def ramp(sizes):
        """Rows join up to each size in turn, then all but the first four leave (arrays shrink back)."""
        seen = {}
        for n in sizes:
            new = store.allocate(n - store.rows)
            joined = _random_state(rnn, gen, len(new))
            store.write_rows(new, joined)
            for j, slot in enumerate(new.tolist()):
                reference[slot] = {k: v[:, j : j + 1] for k, v in joined.items()}
            seen[n] = step()
        leaving = [s for s in sorted(reference) if s >= 4]
        store.free(leaving)
        for s in leaving:
            del reference[s]
        for _ in range(slots.SHRINK_AFTER_STEPS):
            step()
        return seen

    first = ramp([8, 12, 16])
    again = ramp([8, 12, 16])
    assert all(again[n] is first[n] for n in first)  # each size's arrays bound again, none re-made
    _assert_rows_are_their_references(store, reference)

    sizes = {n: slots._Bound(rnn, n).nbytes for n in (4, 8, 12, 16)}
    monkeypatch.setattr(slots, "SPARE_BYTES", sizes[8] + sizes[12] + sizes[16] - 1)  # one short of all three
    third = ramp([8, 12, 16])
    assert third[8] is first[8]
    fourth = ramp([8, 12, 16])
    assert fourth[8] is not first[8]  # left longest ago when the budget ran short: gone, made anew
    assert fourth[16] is third[16]
    _assert_rows_are_their_references(store, reference)


def test_a_copied_generator_draws_what_the_original_draws_and_moves_on_its_own():
    from rnngen.decoding.random_streams import copy_generator

    original, twin = row_generator(3, 1), row_generator(3, 1)
    original.random(7)
    twin.random(7)
    copy = copy_generator(original)
    assert copy.random(5).tolist() == twin.random(5).tolist()
    assert original.random(5).tolist() == copy_generator(row_generator(3, 1)).random(12)[7:].tolist()


def test_slot_generators_draw_what_each_rows_own_generator_draws():
    """Many rows' PCG64 streams advanced together give numpy's own doubles, and the position goes back."""
    from rnngen.decoding.random_streams import SlotGenerators

    rows = [row_generator(11, i) for i in range(6)]
    twins = [row_generator(11, i) for i in range(6)]
    streams = SlotGenerators(6)
    for slot, g in enumerate(rows):
        streams.load(slot, g)
    for draw_round in range(20):
        slots = np.array([0, 2, 3, 5]) if draw_round % 2 else np.arange(6)
        got = streams.random(slots)
        assert got.tolist() == [twins[s].random() for s in slots.tolist()]
    for slot, g in enumerate(rows):
        streams.store(slot, g)
        assert g.random() == twins[slot].random()


def test_slot_generators_hand_out_each_rows_own_numbers_in_step_and_out_of_step():
    """`random_range` over rows at one position in their blocks (a column at a time) and at several,
    mixed with one row drawing alone, a row joining, a reorder and snapshots, across block refills:
    every row draws its own generator's numbers, and its snapshot goes on from there."""
    from rnngen.decoding.random_streams import BLOCK, SlotGenerators

    def start(rows: int):
        streams, twins = SlotGenerators(4), {}
        for slot in range(rows):
            streams.load(slot, row_generator(5, slot))
            twins[slot] = row_generator(5, slot)
        return streams, twins

    def draw(streams, twins, steps: int, n: int) -> None:
        for _ in range(steps):
            assert streams.random_range(n).tolist() == [twins[s].random() for s in range(n)]

    def snapshots_go_on(streams, twins) -> None:
        for slot, twin in twins.items():
            snapshot = row_generator(0, 99)
            streams.store(slot, snapshot)
            assert snapshot.bit_generator.state == twin.bit_generator.state

    streams, twins = start(3)
    draw(streams, twins, 2 * BLOCK + 20, 3)  # in step, past two refills
    assert streams.random(np.array([1])).tolist() == [twins[1].random()]  # row 1 now one ahead
    draw(streams, twins, BLOCK + 10, 3)  # out of step: the rows' blocks run out at different steps
    streams.load(3, row_generator(5, 3))
    twins[3] = row_generator(5, 3)
    draw(streams, twins, BLOCK, 4)
    snapshots_go_on(streams, twins)

    streams, twins = start(2)
    draw(streams, twins, 10, 2)
    snapshots_go_on(streams, twins)  # taken while in step
    draw(streams, twins, 10, 2)
    streams.gather(np.array([1, 0]))  # reordered while in step
    twins = {0: twins[1], 1: twins[0]}
    draw(streams, twins, BLOCK, 2)
    snapshots_go_on(streams, twins)

    streams, twins = start(3)
    draw(streams, twins, 10, 2)  # rows 0 and 1 in step; row 2 has drawn nothing
    streams.gather(np.array([2, 0, 1]))
    twins = {0: twins[2], 1: twins[0], 2: twins[1]}
    draw(streams, twins, 10, 3)
    snapshots_go_on(streams, twins)

    streams, twins = start(2)
    draw(streams, twins, 10, 2)
    streams.load(1, row_generator(5, 7))  # a new row in slot 1 while the rows are in step
    twins[1] = row_generator(5, 7)
    draw(streams, twins, 10, 2)
    snapshots_go_on(streams, twins)


def test_draws_never_round_up_to_one_in_the_graph(rnn):
    """A double just below 1 would be 1.0 as the graph's float32 and land past every token's
    cumulative probability (on a token without probability); draws are lowered to BELOW_ONE."""
    from rnngen.decoding.random_streams import BELOW_ONE, SlotGenerators, uniform_draws
    from rnngen.model.runtime import sampling_feeds

    class Highest:  # a generator whose every number is the largest double below 1
        def random(self, size=None):
            top = np.nextafter(1.0, 0.0)
            return top if size is None else np.full(size, top)

    assert np.float32(1.0 - 1e-9) == 1.0 and np.float32(BELOW_ONE) < 1.0
    assert uniform_draws(Highest()) == BELOW_ONE
    streams = SlotGenerators(3)
    for slot in range(3):
        streams.load(slot, np.random.default_rng(slot))
    streams._generators[1] = Highest()
    assert (streams.random_range(3).astype(np.float32) < 1.0).all()
    assert streams.random(np.array([1]))[0] == BELOW_ONE
    # In the graph, at a temperature so low that most tokens' probabilities are 0 in float32:
    # the highest draw picks a token that has probability; 1.0 would not.
    batch, vocab, temperature = 8, rnn.config.vocab_size, 0.002
    gen = np.random.default_rng(3)
    state = {k: gen.normal(0, 0.5, v.shape).astype(np.float32) for k, v in rnn.initial_state(batch).items()}
    tokens = gen.integers(0, vocab, batch)

    def sampled(uniform):
        feeds = sampling_feeds(batch, np.full(batch, temperature, np.float32), np.full(batch, uniform, np.float32))
        logits, next_tokens, _, _ = rnn.step_sample(tokens, state, feeds)
        probs = np.exp((logits.astype(np.float64) - logits.max(axis=1, keepdims=True)) / temperature)
        return probs[np.arange(batch), next_tokens], next_tokens

    assert (sampled(BELOW_ONE)[0] > 1e-12).all()  # relative to the most likely token's 1
    probs_at_one, _ = sampled(1.0)  # no token's cumulative weight passes the total: one without probability
    assert (probs_at_one < 1e-30).any()


def test_in_graph_sampling_matches_the_numpy_rule(rnn):
    """The step graph's temperature sampling draws what the numpy sampler draws for the same uniform."""
    gen = np.random.default_rng(5)
    batch = 64
    state = {k: gen.normal(0, 0.5, v.shape).astype(np.float32) for k, v in rnn.initial_state(batch).items()}
    tokens = gen.integers(0, rnn.config.vocab_size, batch)
    temperature = gen.choice([0.0, 0.5, 1.0, 1.7], batch).astype(np.float32)
    uniform = gen.random(batch).astype(np.float32)
    from rnngen.model.runtime import sampling_feeds

    logits, next_tokens, log_z, _ = rnn.step_sample(tokens, state, sampling_feeds(batch, temperature, uniform))
    for b in range(batch):
        if temperature[b] == 0:
            assert next_tokens[b] == logits[b].argmax()
            continue
        probs = filtered_probs(logits[b : b + 1].astype(np.float64), rp(temperature=float(temperature[b])))
        assert next_tokens[b] == draw(probs, np.array([uniform[b]], dtype=np.float64))[0]


def test_graph_and_numpy_rows_mix_in_one_batch(rnn):
    """Temperature-only rows (sampled in the graph) and top-p rows (numpy) each decode as they do alone."""
    tok = rnn.tokenizer
    plain = GenerationParams(max_new_tokens=40, seed=4, temperature=0.9)
    nucleus = GenerationParams(max_new_tokens=40, seed=5, temperature=0.9, top_p=0.8)
    engine = DecodeEngine(rnn)
    rows = []
    for p in (plain, nucleus, plain):
        rows.append(make_row(rnn, tok.encode("the"), p, len(rows)))
        engine.add([rows[-1]], *engine.prefill(tok.encode("the")))
    run_to_end(engine)
    assert rows[0].text == rows[2].text == alone(rnn, "the", plain)
    assert rows[1].text == alone(rnn, "the", nucleus)


def test_greedy_rows_take_the_argmax_when_decoded_with_sampled_rows(rnn):
    """Greedy rows that go through numpy (the first token after a prefill, n-gram bans) next to
    top-k sampled rows still take the most likely token, as they do alone."""
    tok = rnn.tokenizer
    greedy = GenerationParams(max_new_tokens=40, temperature=0.0, seed=0)
    greedy_banned = GenerationParams(max_new_tokens=40, temperature=0.0, seed=0, no_repeat_ngram_size=3)
    sampled = GenerationParams(max_new_tokens=40, seed=3, temperature=1.5, top_k=8)
    engine = DecodeEngine(rnn)
    rows = []
    for p in (greedy, sampled, greedy_banned, sampled):
        rows.append(make_row(rnn, tok.encode("the"), p, len(rows)))
    logits, state = engine.prefill(tok.encode("the"))
    engine.add(rows, logits[[0] * 4], state.select([0] * 4))
    run_to_end(engine)
    assert rows[0].text == alone(rnn, "the", greedy)
    assert rows[2].text == alone(rnn, "the", greedy_banned)
    assert rows[1].text == rows[3].text == alone(rnn, "the", sampled)


def test_a_long_stream_keeps_constant_memory(rnn):
    """Tokens are counted, not listed; history is a window; a streaming row does not collect text."""
    import tracemalloc

    from rnngen.decoding.rows import HISTORY_WINDOW

    params = GenerationParams(max_new_tokens=10**6, seed=1, repetition_penalty=1.1, presence_penalty=0.2)
    engine = DecodeEngine(rnn)
    row = make_row(rnn, [1, 2, 3], params, "long")
    row.keep_text = False
    engine.add([row], *engine.prefill([1, 2, 3]))
    for _ in range(1500):
        engine.step()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(3000):
        engine.step()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert row.count == 4500
    assert len(row.history) == HISTORY_WINDOW
    assert len(row.seen) <= rnn.config.vocab_size and len(row.counts) <= rnn.config.vocab_size
    assert row.text == ""
    assert grown < 64 * 1024, grown  # 3000 more tokens, no more memory


def test_the_device_slot_stepper_plugs_into_the_engine_and_decodes_the_same(rnn):
    """The engine runs on any SlotStore: SlotStepper (device slots, CUDA graphs on CUDA; here its
    same code path on the CPU, without capture) gives the text of the host store, rows joining late."""
    from rnngen.model.graph_stepper import SlotStepper

    tok = rnn.tokenizer
    params = [GenerationParams(max_new_tokens=30, seed=s, temperature=t, top_k=k)
              for s, t, k in ((1, 0.9, 0), (2, 0.0, 0), (3, 1.1, 8))]
    texts = {}
    for name, store in (("host", None), ("stepper", SlotStepper(rnn, capacity=4, cuda_graphs=False))):
        engine = DecodeEngine(rnn, store=store)
        rows = []
        for i, p in enumerate(params):
            rows.append(make_row(rnn, tok.encode("the"), p, i))
            engine.add([rows[-1]], *engine.prefill(tok.encode("the")))
            engine.step()  # the next row joins a running batch
        run_to_end(engine)
        texts[name] = [r.text for r in rows]
    assert texts["stepper"] == texts["host"]
    assert texts["host"][0] == alone(rnn, "the", params[0])
