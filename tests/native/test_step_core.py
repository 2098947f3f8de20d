"""native/step_core.pyx: the persistent decode batch, updated by diff, equals the batch
ModelRunner's general path builds from scratch for the same plan, step after step of
randomized traces (sequences joining, leaving, growing blocks, coming back with new
blocks, rows reordered); append_tokens decides what Sequence.check_finished decides;
the scheduler's native loops hand each sequence that is not plain to the Python loop;
publish_plain writes the bytes records.py's encoders write.
(tests/engine/test_scheduler_reference.py compares the whole scheduler with a reference.)"""
from types import SimpleNamespace

import numpy as np
import pytest

from pyforge.engine.model_runner import ModelRunner
from pyforge.engine.sampling_params import SamplingParams
from pyforge.engine.sequence import Sequence, SequenceStatus
from pyforge.engine.block_manager import BlockManager
from pyforge.ipc import Finish, encode, encode_token
from pyforge.engine.scheduler import Scheduler
from pyforge.native.step_core import (KIND_DRAFTS, KIND_GRAMMAR, KIND_POOLING, KIND_PROMPT_LOGPROBS, DecodeBatch,
                                     advance_computed, append_tokens, pack_sampling, plan_kinds, publish_plain,
                                     schedule_running, schedule_waiting, store_rng_states)

BLOCK = 4
FIELDS = ("token_ids", "positions", "slot_mapping", "block_tables", "context_lens")


def general_batch(plan):
    """The general path's batch (every row: no fast path) and its per-entry views."""
    runner = ModelRunner(model=None, kv_cache=SimpleNamespace(block_size=BLOCK))
    batch, _ = runner.build_batch(plan, all_logits=True)
    return batch


class Trace:
    """Decoding sequences over a shuffled block pool: each step some join, some leave,
    some come back (with fresh blocks, as after a preemption), the rest decode one token."""

    def __init__(self, rng):
        self.rng = rng
        self.free = rng.permutation(4000).tolist()
        self.running, self.parked, self.next_id = [], [], 0

    def join(self):
        n = int(self.rng.integers(1, 3 * BLOCK))
        seq = Sequence(self.next_id, self.rng.integers(0, 1000, n).tolist(), SamplingParams(), 0, 10_000)
        self.next_id += 1
        self._admit(seq)

    def _admit(self, seq):
        seq.num_computed_tokens = seq.num_tokens - 1
        seq.block_table = [self.free.pop() for _ in range(-(-seq.num_tokens // BLOCK))]
        self.running.append(seq)

    def step(self):
        rng = self.rng
        for _ in range(int(rng.integers(0, 4))):
            self.join()
        if self.parked and rng.random() < 0.3:
            self._admit(self.parked.pop())
        for seq in list(self.running):
            if rng.random() < 0.1:
                self.running.remove(seq)
                self.free.extend(seq.block_table)
                seq.block_table = []
                if rng.random() < 0.5:
                    self.parked.append(seq)
        for seq in self.running:        # the previous step's token computed, a new one sampled
            seq.num_computed_tokens = seq.num_tokens
            seq.token_ids.append(int(rng.integers(0, 1000)))
            while len(seq.block_table) * BLOCK < seq.num_tokens:
                seq.block_table.append(self.free.pop())
        order = rng.permutation(len(self.running))
        return [(self.running[i], 1) for i in order]


@pytest.mark.parametrize("seed", range(6))
def test_the_persistent_batch_equals_the_general_batch_every_step(seed):
    trace = Trace(np.random.default_rng(seed))
    decode = DecodeBatch(BLOCK)
    for _ in range(4):
        trace.join()
    for _ in range(60):
        plan = trace.step()
        if not plan:
            continue
        arrays, plan_index = decode.build(plan)
        tokens, positions, slots, tables, context_lens, qsl, logits_rows = arrays
        assert sorted(plan_index) == list(range(len(plan)))
        reference = general_batch([plan[k] for k in plan_index])    # the plan in row order
        for name, got in zip(FIELDS, (tokens, positions, slots, tables, context_lens)):
            want = getattr(reference, name)
            assert got.dtype == np.int32 and np.array_equal(got, want), name
        assert np.array_equal(qsl, reference.query_start_loc)
        assert np.array_equal(logits_rows, reference.logits_rows)


def test_a_sequence_keeps_its_row_while_it_decodes():
    trace = Trace(np.random.default_rng(1))
    for _ in range(3):
        trace.join()
    decode = DecodeBatch(BLOCK)
    plan = [(seq, 1) for seq in trace.running]
    first = [plan[k][0].seq_id for k in decode.build(plan)[1]]
    for seq in trace.running:
        seq.num_computed_tokens = seq.num_tokens
        seq.token_ids.append(5)
        while len(seq.block_table) * BLOCK < seq.num_tokens:
            seq.block_table.append(trace.free.pop())
    plan.reverse()      # the plan's order changed; the rows did not
    assert [plan[k][0].seq_id for k in decode.build(plan)[1]] == first


def test_a_step_that_is_not_pure_decode_is_left_to_the_general_path():
    trace = Trace(np.random.default_rng(2))
    trace.join()
    seq = trace.running[0]
    decode = DecodeBatch(BLOCK)
    assert decode.build([(seq, 2)]) is None
    seq.num_computed_tokens -= 1
    assert decode.build([(seq, 1)]) is None


def test_a_missing_kv_block_is_an_error_not_a_stray_slot():
    trace = Trace(np.random.default_rng(3))
    trace.join()
    seq = trace.running[0]
    seq.block_table = []
    with pytest.raises(ValueError, match="no KV block"):
        DecodeBatch(BLOCK).build([(seq, 1)])


def test_bad_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        DecodeBatch(0)


@pytest.mark.parametrize("seed", range(4))
def test_append_tokens_decides_as_check_finished(seed):
    rng = np.random.default_rng(seed)
    eos = (2, 7)
    seqs, expected = [], []
    for i in range(200):
        params = SamplingParams(max_tokens=int(rng.integers(1, 4)), ignore_eos=bool(rng.random() < 0.3),
                                stop_token_ids=rng.integers(0, 12, int(rng.integers(0, 3))).tolist())
        seq = Sequence(i, rng.integers(0, 12, 3).tolist(), params, 0, 10_000)
        seq.token_ids.extend(rng.integers(0, 12, int(rng.integers(0, params.max_tokens))).tolist())
        twin = Sequence(i, list(seq.token_ids[:3]), params, 0, 10_000)
        twin.token_ids = list(seq.token_ids)
        token = int(rng.integers(0, 12))
        twin.token_ids.append(token)
        expected.append((twin.check_finished(token, eos), twin.token_ids))
        seqs.append((seq, token))
    statuses = append_tokens([s for s, _ in seqs], np.array([t for _, t in seqs], dtype=np.int32), eos)
    for (seq, _), status, (want_status, want_ids) in zip(seqs, statuses.tolist(), expected):
        assert SequenceStatus(status) == want_status
        assert seq.token_ids == want_ids


def test_append_tokens_wants_one_token_per_sequence():
    seq = Sequence(0, [1, 2], SamplingParams(), 0, 100)
    with pytest.raises(ValueError, match="1 tokens for 0 sequences"):
        append_tokens([], np.array([1], dtype=np.int32), ())
    assert seq.token_ids == [1, 2]


def test_advance_computed_counts_tokens_and_names_who_filled_a_block():
    a = Sequence(0, list(range(10)), SamplingParams(), 0, 100)     # prefill 10 of 10: two full blocks
    b = Sequence(1, list(range(6)), SamplingParams(), 0, 100)      # decode, drafts not counted yet
    b.num_computed_tokens, b.num_registered_blocks, b.draft_tokens = 5, 1, [7, 8]
    c = Sequence(2, list(range(3)), SamplingParams(), 0, 100)      # a chunk inside its first block
    full = advance_computed([(a, 10), (b, 3), (c, 2)], BLOCK)
    assert (a.num_computed_tokens, b.num_computed_tokens, c.num_computed_tokens) == (10, 6, 2)
    assert full == [a]
    b.num_computed_tokens, b.draft_tokens = 7, []
    assert advance_computed([(b, 1)], BLOCK) == [b]
    assert advance_computed([(b, 1)], 0) == []       # prefix caching off


def test_plan_kinds_names_the_cases_a_plan_holds():
    plain = Sequence(0, [1, 2], SamplingParams(), 0, 100)
    embedding = Sequence(1, [1, 2], SamplingParams(pooling="mean"), 0, 100)
    logprobs = Sequence(2, [1, 2], SamplingParams(prompt_logprobs=1), 0, 100)
    drafted = Sequence(3, [1, 2], SamplingParams(), 0, 100)
    drafted.draft_tokens = [5]
    guided = Sequence(4, [1, 2], SamplingParams(), 0, 100)
    guided.matcher = object()
    assert plan_kinds([]) == plan_kinds([(plain, 1)]) == 0
    assert plan_kinds([(plain, 1), (embedding, 2)]) == KIND_POOLING
    assert plan_kinds([(logprobs, 2), (drafted, 2)]) == KIND_PROMPT_LOGPROBS | KIND_DRAFTS
    assert plan_kinds([(guided, 1), (plain, 1)]) == KIND_GRAMMAR


@pytest.mark.parametrize("seed", range(3))
def test_pack_sampling_packs_what_the_python_columns_hold(seed):
    from pyforge.engine.sampler import _param_arrays
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(50):
        params = SamplingParams(temperature=float(rng.uniform(0, 2)), top_k=int(rng.integers(-1, 50)),
                                top_p=float(rng.uniform(0.01, 1)), min_p=float(rng.uniform(0, 1)),
                                repetition_penalty=float(rng.choice([1.0, rng.uniform(0.5, 2)])),
                                presence_penalty=float(rng.choice([0.0, rng.uniform(-2, 2)])),
                                frequency_penalty=float(rng.choice([0.0, rng.uniform(-2, 2)])),
                                logprobs=None if rng.random() < 0.5 else int(rng.integers(0, 21)),
                                logit_bias={3: 1.0} if rng.random() < 0.1 else {},
                                min_tokens=int(rng.integers(0, 2)) if rng.random() < 0.1 else 0)
        rows.append(Sequence(i, [1], params, int(rng.integers(0, 2**63)) * 2 + 1, 100))
    sub = rows[:int(rng.integers(1, 50))]
    columns, rng_state, wants, n_top, penalised, biased = pack_sampling(sub)
    params = [row.params for row in sub]
    for got, want in zip(columns, _param_arrays(params)):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert rng_state.tolist() == [row.rng_state for row in sub]
    assert wants.tolist() == [int(p.logprobs is not None) for p in params]
    assert n_top == max(p.logprobs or 0 for p in params)
    assert penalised == any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params)
    assert biased == any(p.logit_bias or p.min_tokens for p in params)
    store_rng_states(sub, np.arange(len(sub), dtype=np.uint64))
    assert [row.rng_state for row in sub] == list(range(len(sub)))


def scheduler_with(n_blocks, *prompts_and_params, max_num_seqs=8, budget=100):
    sched = Scheduler(BlockManager(n_blocks, BLOCK), max_num_seqs, budget)
    seqs = [Sequence(i, list(range(10, 10 + n)), params, 0, 10_000) for i, (n, params) in enumerate(prompts_and_params)]
    for seq in seqs:
        sched.add(seq)
    return sched, seqs


def test_schedule_waiting_admits_plain_heads_and_hands_over_at_the_first_other():
    sched, seqs = scheduler_with(16, (3, SamplingParams()), (5, SamplingParams()),
                                 (4, SamplingParams(prompt_logprobs=0)), (2, SamplingParams()))
    plan = []
    budget, special = schedule_waiting(sched, plan, 20)
    assert [(s.seq_id, n) for s, n in plan] == [(0, 3), (1, 5)] and budget == 12 and special
    assert sched.running == seqs[:2] and list(sched.waiting) == seqs[2:]
    assert all(s.status == SequenceStatus.RUNNING for s in seqs[:2]) and seqs[2].status == SequenceStatus.WAITING


def test_schedule_waiting_stops_at_the_budget_and_max_num_seqs():
    sched, seqs = scheduler_with(16, (3, SamplingParams()), (5, SamplingParams()), max_num_seqs=1)
    plan = []
    assert schedule_waiting(sched, plan, 2) == (0, False)
    assert [(s.seq_id, n) for s, n in plan] == [(0, 2)] and list(sched.waiting) == seqs[1:]


def test_schedule_running_hands_over_a_sequence_with_drafts_by_its_index():
    sched, seqs = scheduler_with(16, (3, SamplingParams()), (3, SamplingParams()), (3, SamplingParams()))
    sched.schedule()
    for seq in seqs:
        seq.num_computed_tokens = seq.num_tokens
        seq.token_ids.append(7)
    seqs[1].draft_tokens = [8, 9]
    plan = []
    assert schedule_running(sched, plan, 0, 100) == (1, 99)
    assert schedule_running(sched, plan, 2, 99) == (3, 98)
    assert [(s.seq_id, n) for s, n in plan] == [(0, 1), (2, 1)]


def test_schedule_running_preempts_the_newest_and_at_last_itself():
    sched, seqs = scheduler_with(2, (4, SamplingParams()), (4, SamplingParams()))     # each holds one full block
    sched.schedule()
    for seq in seqs:
        seq.num_computed_tokens = seq.num_tokens
        seq.token_ids.append(7)
    plan = []
    # the first needs a second block: the second gives its block and waits; then the second's turn never comes
    assert schedule_running(sched, plan, 0, 100) == (1, 99)
    assert [(s.seq_id, n) for s, n in plan] == [(0, 1)] and list(sched.waiting) == [seqs[1]]
    assert seqs[1].status == SequenceStatus.PREEMPTED and sched.num_preemptions == 1
    sched.running[0].token_ids.extend([7] * 4)      # now it needs a third block, and there is none
    sched.running[0].num_computed_tokens = sched.running[0].num_tokens - 1
    plan = []
    assert schedule_running(sched, plan, 0, 100) == (0, 100)
    assert plan == [] and sched.running == [] and list(sched.waiting) == [seqs[0], seqs[1]]


def publishing(rows):
    """(seqs, by_seq, entries) for publish_plain: rows of (seq_id, slot, request_id, prompt, output)."""
    seqs, by_seq, entries = [], {}, {}
    for seq_id, slot, request_id, n_prompt, n_output in rows:
        seq = SimpleNamespace(seq_id=seq_id, num_prompt_tokens=n_prompt, token_ids=[1] * (n_prompt + n_output),
                              num_cached_prompt_tokens=n_prompt // 2)
        entry = SimpleNamespace(request_id=request_id, owner=SimpleNamespace(slot=slot), started=False,
                                want_logprobs=False, seq=seq)
        seqs.append(seq)
        by_seq[seq_id] = entries[request_id] = entry
    return seqs, by_seq, entries


def test_publish_plain_writes_what_the_record_encoders_write():
    seqs, by_seq, entries = publishing([(0, 1, 7 << 48 | 3, 5, 2), (1, 0, 9, 4, 1), (2, 1, (1 << 64) - 1, 3, 6),
                                        (3, 1, 11, 2, 1)])
    del by_seq[3]                           # a request the table no longer holds: nothing of it
    tokens = np.array([42, -1, 2**31 - 1, 8], np.int32)
    statuses = np.array([SequenceStatus.RUNNING, SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                         SequenceStatus.RUNNING], np.int32)
    batches = {0: (bytearray(b"earlier"), ["someone"])}
    started = publish_plain(seqs, tokens, statuses, by_seq, entries, batches, None)
    assert started == 5 + 4 + 3
    ids = [7 << 48 | 3, 9, (1 << 64) - 1]
    assert bytes(batches[1][0]) == (encode_token(ids[0], 42) + encode_token(ids[2], 2**31 - 1)
                                    + encode(Finish(ids[2], "length", 3, 6, 1)))
    assert bytes(batches[0][0]) == b"earlier" + encode_token(ids[1], -1) + encode(Finish(ids[1], "stop", 4, 1, 2))
    assert [e.request_id for e in batches[1][1]] == [ids[0], ids[2]]
    assert list(entries) == [ids[0], 11] and list(by_seq) == [0]       # the finished left the table


def test_publish_plain_hands_requests_wanting_logprobs_back():
    seqs, by_seq, entries = publishing([(0, 0, 1, 3, 1)])
    by_seq[0].want_logprobs = True
    handed, batches = [], {}
    publish_plain(seqs, np.array([5], np.int32), np.array([SequenceStatus.FINISHED_STOPPED], np.int32), by_seq,
                  entries, batches, lambda entry, row: handed.append((entry.request_id, row)))
    assert handed == [(1, 0)] and batches == {} and list(by_seq) == [0]     # the table's own path forgets it


def test_publish_plain_refuses_mismatched_rows_statuses_it_cannot_encode_and_foreign_batches():
    seqs, by_seq, entries = publishing([(0, 0, 1, 3, 1), (1, 0, 2, 3, 1)])
    with pytest.raises(ValueError, match="2 tokens and 1 statuses for 2 sequences"):
        publish_plain(seqs, np.zeros(2, np.int32), np.zeros(1, np.int32), by_seq, entries, {}, None)
    aborted = np.full(2, SequenceStatus.FINISHED_ABORTED, np.int32)
    with pytest.raises(ValueError, match="not one a plain step ends with"):
        publish_plain(seqs, np.zeros(2, np.int32), aborted, by_seq, entries, {}, None)
    running = np.full(2, SequenceStatus.RUNNING, np.int32)
    with pytest.raises(TypeError):
        publish_plain(seqs, np.zeros(2, np.int32), running, by_seq, entries, {0: [bytearray(), []]}, None)
    with pytest.raises(TypeError):
        publish_plain(seqs, np.zeros(2, np.int32), running, by_seq, entries, {0: (b"", [])}, None)
