"""ModelRunner.build_batch: the decode fast path builds exactly the batch the general
path builds for the same plan (the general path, with all_logits, takes every row)."""
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
