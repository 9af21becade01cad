"""The server's prefill: chunked between decoding steps, shortest first, and the prefix-state cache."""

import re
import time
import urllib.request

import numpy as np

from rnngen.decoding.generation import generate
from rnngen.decoding.params import GenerationParams
from rnngen.model.runtime import RnnModel
from rnngen.serving.client import RnngenClient
from rnngen.serving.prefill import PrefillJob, Prefiller, PrefixCache
from rnngen.serving.server import RnngenServer, ServerConfig
from rnngen.v1 import rnngen_pb2 as pb


def state_of(value: float) -> dict:
    return {"h": np.full((1, 1, 4), value, dtype=np.float32)}


def test_prefix_cache_finds_the_longest_cached_prefix_and_where_prompts_part():
    cache = PrefixCache(budget_bytes=10_000)
    logits = np.zeros(3, dtype=np.float32)
    cache.put([1, 2, 3, 4, 5], state_of(5), logits)
    assert cache.lookup([1, 2, 3, 9]) == (0, None, 3)  # nothing cached on the way; parts from it after 3 tokens
    cache.put([1, 2, 3], state_of(3), logits)  # the edge is split at the parting point
    depth, node, shared = cache.lookup([1, 2, 3, 9])
    assert (depth, shared) == (3, 3) and node.entry[0]["h"][0, 0, 0] == 3
    depth, node, shared = cache.lookup([1, 2, 3, 4, 5, 6])
    assert (depth, shared) == (5, 5) and node.entry[0]["h"][0, 0, 0] == 5
    assert cache.lookup([7]) == (0, None, 0)
    assert len(cache) == 2 and cache.bytes == 2 * (16 + 12)


def test_prefix_cache_keeps_the_recently_used_within_its_budget():
    entry = 16 + 12  # one state (4 floats) and logits (3 floats)
    cache = PrefixCache(budget_bytes=2 * entry)
    logits = np.zeros(3, dtype=np.float32)
    cache.put([1, 1], state_of(1), logits)
    cache.put([2, 2], state_of(2), logits)
    cache.lookup([1, 1, 9])  # used: [2, 2] is now the least recently used
    cache.put([3, 3], state_of(3), logits)
    assert cache.lookup([2, 2])[1] is None and cache.lookup([1, 1])[0] == 2 and cache.lookup([3, 3])[0] == 2
    assert cache.bytes == 2 * entry and len(cache) == 2


def test_chunked_batched_prefill_equals_one_whole_prefill(char_model_file):
    model = RnnModel.load(char_model_file, device="cpu")
    texts = ("the quick brown fox jumps over the lazy dog. " * 6, "to be or not to be, that is the question. " * 4,
             "a stitch in time saves", "to")
    prompts = [model.tokenizer.encode(t) for t in texts]
    prefiller = Prefiller(model, PrefixCache(1 << 20), chunk=7, max_batch=2)
    jobs = [PrefillJob(p) for p in prompts]
    for job in jobs:
        prefiller.start(job)
    finished_order = []
    while not all(j.finished for j in jobs):
        prefiller.round(jobs)
        finished_order += [i for i, j in enumerate(jobs) if j.finished and i not in finished_order]
    assert finished_order == [3, 2, 1, 0]  # fewest tokens left first: short prompts never wait for long ones
    for prompt, job in zip(prompts, jobs):
        logits, state = model.prefill(prompt)
        np.testing.assert_allclose(job.logits, logits, rtol=1e-5, atol=1e-5)
        for name in state:
            np.testing.assert_allclose(job.state[name], state[name], rtol=1e-5, atol=1e-5)


def start(model_file, **kw):
    return RnngenServer(ServerConfig(models=[model_file], port=0, metrics_port=0, **kw)).start()


def metric(server, name):
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    match = re.search(rf'{name}\{{model="char"\}} (\S+)', body)
    return float(match.group(1)) if match else 0.0


def test_prefix_cache_hits_give_the_text_of_an_uncached_run(char_model_file):
    shared = "all that glitters is not gold; all that wander are not lost. " * 4
    prompts = [shared + "the", shared + "a stitch", shared + "to be", shared + "the"]
    params = [GenerationParams(max_new_tokens=60, temperature=0.0), GenerationParams(max_new_tokens=60, seed=4),
              GenerationParams(max_new_tokens=60, seed=5, temperature=1.1), GenerationParams(max_new_tokens=60, seed=6)]
    local = RnnModel.load(char_model_file, device="cpu")
    server = start(char_model_file, prefill_chunk=16)
    try:
        with RnngenClient(f"127.0.0.1:{server.port}") as client:
            for prompt, p in zip(prompts, params):
                text = "".join(m.text for m in client.generate(prompt, params=p))
                assert text == generate(local, prompt, p).text
        # 1: miss; 2: miss, its state where it parts from 1 is kept; 3: starts there; 4: prompt 1 again, whole
        assert metric(server, "rnngen_prefix_cache_misses_total") == 2
        assert metric(server, "rnngen_prefix_cache_hits_total") == 2
        assert metric(server, "rnngen_prefix_cache_hit_tokens_total") == len(shared) + len(shared + "the")
        assert metric(server, "rnngen_prefix_cache_bytes") > 0
    finally:
        server.shutdown()
    off = start(char_model_file, prefix_cache_mb=0)
    try:
        with RnngenClient(f"127.0.0.1:{off.port}") as client:
            assert "".join(m.text for m in client.generate(prompts[0], params=params[1])) == generate(local, prompts[0], params[1]).text
        assert metric(off, "rnngen_prefix_cache_hits_total") == metric(off, "rnngen_prefix_cache_misses_total") == 0
    finally:
        off.shutdown()


def enqueue_together_and_wait(server, prompts, params, events):
    """The prompts reach the scheduler together (none seen by the decoding thread before the others);
    then wait until every stream has ended."""
    served = server.models[0]
    scheduler = served.scheduler
    with scheduler._lock:
        for prompt in prompts:
            scheduler.reserve()
            scheduler.enqueue(server.service._prefill(served, pb.GenerateRequest(prompt=prompt), params)[1])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (scheduler.active == 0 and scheduler.queued == 0 and events):
        time.sleep(0.01)


def test_a_long_prompt_prefills_between_steps_and_a_short_one_overtakes_it(char_model_file):
    server = start(char_model_file, prefill_chunk=8)
    served = server.models[0]
    scheduler, engine = served.scheduler, served.scheduler._engines[0]
    events = []
    real_add, real_step = engine.add, engine.step
    engine.add = lambda rows, logits, state: events.append(("add", [r.tag.prompt_tokens for r in rows])) or real_add(rows, logits, state)
    engine.step = lambda: events.append(("step", len(engine))) or real_step()
    try:
        long_prompt = "the quick brown fox jumps over the lazy dog. " * 40  # 1,800 tokens: 225 chunks of 8
        enqueue_together_and_wait(server, (long_prompt, "to be"), GenerationParams(max_new_tokens=400, seed=1), events)
        adds = [i for i, e in enumerate(events) if e[0] == "add"]
        assert [events[i][1] for i in adds] == [[5], [len(long_prompt)]]  # the short prompt joined first
        steps_while_long_prefilled = [e for e in events[adds[0]:adds[1]] if e[0] == "step" and e[1] == 1]
        assert len(steps_while_long_prefilled) > 50  # the short stream decoded between the long prompt's chunks
    finally:
        server.shutdown()


def test_a_prompt_the_cache_holds_whole_joins_before_the_next_prefill_round(char_model_file):
    """A prompt the prefix cache holds whole needs no prefill round: it joins at the next step
    instead of waiting behind a round of other prompts' chunks (a few milliseconds each)."""
    server = start(char_model_file, prefill_chunk=8)
    served = server.models[0]
    scheduler, engine = served.scheduler, served.scheduler._engines[0]
    try:
        with RnngenClient(f"127.0.0.1:{server.port}") as client:
            list(client.generate("to be", params=GenerationParams(max_new_tokens=3)))  # "to be" is cached now
        events = []
        real_add, real_round = engine.add, scheduler.prefiller.round
        engine.add = lambda rows, logits, state: events.append(("add", [r.tag.prompt_tokens for r in rows])) or real_add(rows, logits, state)
        scheduler.prefiller.round = lambda jobs: events.append(("round", len(jobs))) or real_round(jobs)
        long_prompt = "the quick brown fox jumps over the lazy dog. " * 40
        enqueue_together_and_wait(server, (long_prompt, "to be"), GenerationParams(max_new_tokens=50, seed=1), events)
        assert events[0] == ("add", [5])  # before any round: the cached prompt joined first
        assert ("round", 1) in events and events[-1] == ("add", [len(long_prompt)])
        assert metric(server, "rnngen_prefix_cache_hits_total") == 1
    finally:
        server.shutdown()
