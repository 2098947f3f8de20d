"""The CPU backend's own reference pieces (the primitives are tested in tests/native)."""
import numpy as np

from pyforge.backends.cpu import CpuBackend
from pyforge.native import sampler as ns


def test_greedy_tokens_are_the_native_samplers():
    """greedy_tokens (the protocol's greedy pick, which the CUDA backend runs on the device) is
    the native sampler's greedy row: NaN skipped, ties to the lower id, the first -inf when
    nothing is larger, id 0 for an all-NaN row; the raw logprob with NaN logits counting for
    nothing."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((6, 300)) * 3).astype(np.float32)
    x[1, [10, 200]] = x[1].max() + 1
    x[2, :150] = np.nan
    x[3] = -np.inf
    x[3, 299] = np.nan
    x[4] = np.nan
    n = len(x)
    want, want_lp, *_ = ns.sample(x.copy(), np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32),
                                  np.zeros(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.float32),
                                  np.zeros(n, np.float32), np.zeros(n + 1, np.int32), np.zeros(0, np.int32),
                                  np.zeros(0, np.int32), np.zeros(n, np.uint64))
    tokens, logprobs = CpuBackend.greedy_tokens(x)
    np.testing.assert_array_equal(tokens, want)
    assert tokens[1] == 10 and tokens[3] == 0 and tokens[4] == 0
    finite = [0, 1, 2, 5]
    np.testing.assert_allclose(logprobs[finite], want_lp[finite], rtol=1e-6, atol=1e-6)
