"""ModelRunner.build_batch: the decode fast path, and the one for decode steps with
speculative drafts, build exactly the batch the general path builds for the same plan
(the general path, with all_logits, takes every row)."""
from types import SimpleNamespace

import numpy as np

from pyforge.engine.model_runner import ModelRunner
from pyforge.engine.sampling_params import SamplingParams
from pyforge.engine.sequence import Sequence

FIELDS = ("token_ids", "positions", "slot_mapping", "block_tables", "context_lens", "query_start_loc", "logits_rows")


def decoding(seq_id, n_tokens, block_table, rng):
    seq = Sequence(seq_id, rng.integers(0, 32000, n_tokens - 1).tolist(), SamplingParams(), 0, 10_000)
    seq.token_ids.append(int(rng.integers(0, 32000)))      # the newest token: this step's input
    seq.num_computed_tokens = n_tokens - 1
    seq.block_table = block_table
    return seq


def test_the_decode_fast_path_matches_the_general_path():
    rng = np.random.default_rng(0)
    block_size = 16
    runner = ModelRunner(model=None, kv_cache=SimpleNamespace(block_size=block_size))
    lengths = [2, 15, 16, 17, 40, 129]
    pool = rng.permutation(200).tolist()
    plan = []
    for i, n in enumerate(lengths):
        need = -(-n // block_size)
        plan.append((decoding(i, n, [pool.pop() for _ in range(need)], rng), 1))
    fast, fast_rows = runner.build_batch(plan)
    general, general_rows = runner.build_batch(plan, all_logits=True)
    assert fast_rows == general_rows == list(range(len(plan)))
    for name in FIELDS:
        a, b = getattr(fast, name), getattr(general, name)
        assert a.dtype == b.dtype == np.int32 and np.array_equal(a, b), name
    # and it is the batch the sequences describe
    last = plan[-1][0]
    p = last.num_computed_tokens
    assert fast.slot_mapping[-1] == last.block_table[p // block_size] * block_size + p % block_size


def test_the_drafted_decode_path_matches_the_general_path():
    rng = np.random.default_rng(1)
    block_size = 16
    runner = ModelRunner(model=None, kv_cache=SimpleNamespace(block_size=block_size))
    pool = rng.permutation(200).tolist()
    plan = []
    for i, (n, drafts) in enumerate([(2, 4), (15, 0), (14, 3), (31, 1), (129, 0)]):
        need = -(-(n + drafts) // block_size)      # the drafts' rows have their slots too
        seq = decoding(i, n, [pool.pop() for _ in range(need)], rng)
        seq.draft_tokens = rng.integers(0, 32000, drafts).tolist()
        plan.append((seq, 1 + drafts))
    full = [bool(seq.draft_tokens) for seq, _ in plan]
    fast, fast_rows = runner.build_batch(plan, full)
    general, general_rows = runner.build_batch(plan, all_logits=True)
    assert fast_rows == general_rows == list(range(len(plan)))
    for name in FIELDS:
        a, b = getattr(fast, name), getattr(general, name)
        assert a.dtype == b.dtype == np.int32 and np.array_equal(a, b), name
    assert fast.n_tokens == 5 + 4 + 3 + 1
    # a plan with a prefill chunk in it takes the general path (its rows are not all wanted)
    prefill = decoding(9, 40, [pool.pop() for _ in range(3)], rng)
    prefill.num_computed_tokens = 8
    mixed, rows = runner.build_batch([*plan, (prefill, 16)], [*full, False])
    assert rows == list(range(len(plan))) and len(mixed.logits_rows) == fast.n_tokens   # none of the chunk
