"""pyforge.native.ops against float64 references written here (numpy) and torch
(scaled_dot_product_attention with an explicit mask, HF's rotate-half rope).

Error bound: max |ours - ref| / max |ref| <= 1e-5 unless stated; float32
kernels land around 1e-7. Outputs are poisoned with NaN before each call so an
element a kernel forgets to write fails the comparison.
"""
import numpy as np
import pytest

from pyforge.native import ops

REL_TOL = 1e-5
THREADS = [1, 2]


def rel_err(ours, ref):
    ours = np.asarray(ours, dtype=np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def poisoned(shape):
    return np.full(shape, np.nan, dtype=np.float32)


# -- rmsnorm -------------------------------------------------------------------

@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("n,d", [(1, 64), (7, 4099), (33, 2048)])
def test_rmsnorm(n, d, n_threads):
    rng = np.random.default_rng(n * d)
    x, w = randn(rng, n, d, scale=3.0), randn(rng, d)
    out = poisoned((n, d))
    ops.rmsnorm(x, w, 1e-5, out, n_threads)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt(np.mean(x64**2, axis=1, keepdims=True) + 1e-5) * w
    assert rel_err(out, ref) < REL_TOL
    # elementwise too: every output within a few float32 ulps of its reference
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_rmsnorm_in_place():
    rng = np.random.default_rng(1)
    x, w = randn(rng, 3, 40), randn(rng, 40)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt(np.mean(x64**2, axis=1, keepdims=True) + 1e-6) * w
    ops.rmsnorm(x, w, 1e-6, x)
    assert rel_err(x, ref) < REL_TOL


# -- layernorm -------------------------------------------------------------------

def layernorm_ref(x, w, b, eps):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(x.astype(np.float64))
    return torch.nn.functional.layer_norm(t, (x.shape[-1],), torch.from_numpy(w.astype(np.float64)),
                                          torch.from_numpy(b.astype(np.float64)), eps).numpy()


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("n,d", [(1, 64), (7, 4099), (33, 2048)])
def test_layernorm(n, d, n_threads):
    rng = np.random.default_rng(n + d)
    x, w, b = randn(rng, n, d, scale=3.0) + 5.0, randn(rng, d), randn(rng, d)   # a large mean: no cancellation
    out = poisoned((n, d))
    ops.layernorm(x, w, b, 1e-5, out, n_threads)
    ref = layernorm_ref(x, w, b, 1e-5)
    assert rel_err(out, ref) < REL_TOL
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_layernorm_in_place_and_bad_inputs():
    rng = np.random.default_rng(2)
    x, w, b = randn(rng, 3, 40), randn(rng, 40), randn(rng, 40)
    ref = layernorm_ref(x, w, b, 1e-6)
    ops.layernorm(x, w, b, 1e-6, x)
    assert rel_err(x, ref) < REL_TOL
    with pytest.raises(ValueError, match="bias"):
        ops.layernorm(x, w, b[:39], 1e-6, x)
    with pytest.raises(ValueError, match="eps"):
        ops.layernorm(x, w, b, -1.0, x)


# -- rope ------------------------------------------------------------------------

def rope_ref(x, positions, n_rot, theta, neox, freq_factors=None, mscale=1.0):
    """float64 rope from the definition: pair i turns by pos * theta^(-2i/n_rot) / ff[i], times mscale."""
    out = x.astype(np.float64).copy()
    half = n_rot // 2
    inv = theta ** (-2.0 * np.arange(half) / n_rot)
    if freq_factors is not None:
        inv = inv / freq_factors.astype(np.float64)
    ang = positions.astype(np.float64)[:, None] * inv[None, :]  # [n_tok, half]
    c, s = mscale * np.cos(ang)[:, None, :], mscale * np.sin(ang)[:, None, :]
    i0 = np.arange(half) if neox else 2 * np.arange(half)
    i1 = i0 + half if neox else i0 + 1
    x0, x1 = out[..., i0].copy(), out[..., i1].copy()
    out[..., i0] = x0 * c - x1 * s
    out[..., i1] = x0 * s + x1 * c
    return out


def rope_hf_neox(x, positions, n_rot, theta):
    """Hugging Face's apply_rotary_pos_emb (rotate_half), in float64 torch."""
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(x.astype(np.float64))
    rot, rest = t[..., :n_rot], t[..., n_rot:]
    inv_freq = 1.0 / (theta ** (torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot))
    freqs = torch.from_numpy(positions.astype(np.float64))[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [n_tok, 1, n_rot]
    x1, x2 = rot[..., : n_rot // 2], rot[..., n_rot // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((rot * emb.cos() + rotated * emb.sin(), rest), dim=-1).numpy()


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("hd,n_rot", [(64, 64), (48, 48), (64, 32)])
def test_rope(hd, n_rot, neox, n_threads):
    rng = np.random.default_rng(hd + n_rot)
    n_tok, n_heads = 37, 6
    x = randn(rng, n_tok, n_heads, hd)
    positions = rng.integers(0, 5000, n_tok).astype(np.int32)
    ref = rope_ref(x, positions, n_rot, 10000.0, neox)
    ops.rope(x, positions, n_rot, 10000.0, neox, None, n_threads)
    assert rel_err(x, ref) < REL_TOL


@pytest.mark.parametrize("n_rot", [64, 32])
def test_rope_neox_matches_hf_rotate_half(n_rot):
    rng = np.random.default_rng(5)
    x = randn(rng, 19, 4, 64)
    positions = rng.integers(0, 3000, 19).astype(np.int32)
    ref = rope_hf_neox(x, positions, n_rot, 500000.0)
    ops.rope(x, positions, n_rot, 500000.0, True)
    assert rel_err(x, ref) < REL_TOL


@pytest.mark.parametrize("neox", [False, True])
def test_rope_freq_factors_and_large_positions(neox):
    """Llama 3 style divisors, and positions up to 1e6 (a float angle would be off by ~0.06 rad)."""
    rng = np.random.default_rng(6)
    x = randn(rng, 8, 2, 64)
    positions = np.array([0, 1, 2047, 8191, 65535, 131071, 500000, 1000000], dtype=np.int32)
    ff = rng.uniform(1.0, 8.0, 32).astype(np.float32)
    ref = rope_ref(x, positions, 64, 500000.0, neox, ff)
    ops.rope(x, positions, 64, 500000.0, neox, ff, 2)
    assert rel_err(x, ref) < REL_TOL


@pytest.mark.parametrize("neox", [False, True])
def test_rope_mscale_scales_only_the_rotated_dims(neox):
    """Longrope's attention factor (llama.cpp's attn_factor) on a partially rotated head."""
    rng = np.random.default_rng(7)
    x = randn(rng, 11, 3, 64)
    positions = rng.integers(0, 5000, 11).astype(np.int32)
    ff = rng.uniform(1.0, 8.0, 24).astype(np.float32)
    ref = rope_ref(x, positions, 48, 10000.0, neox, ff, mscale=1.19)
    ops.rope(x, positions, 48, 10000.0, neox, ff, 2, 1.19)
    assert rel_err(x, ref) < REL_TOL
    with pytest.raises(ValueError, match="mscale"):
        ops.rope(x, positions, 48, 10000.0, neox, ff, 2, 0.0)


# -- elementwise -----------------------------------------------------------------

@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("n,f", [(1, 5), (3, 173), (20, 5632)])
def test_silu_mul(n, f, n_threads):
    rng = np.random.default_rng(f)
    gate, up = randn(rng, n, f, scale=4.0), randn(rng, n, f)
    gate.flat[:4] = [-100.0, 100.0, -88.5, 30.0]  # exp over/underflow edges
    out = poisoned((n, f))
    ops.silu_mul(gate, up, out, n_threads)
    g = gate.astype(np.float64)
    ref = g / (1.0 + np.exp(-g)) * up
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-30)


def test_silu_mul_into_gate():
    rng = np.random.default_rng(2)
    gate, up = randn(rng, 4, 100), randn(rng, 4, 100)
    g = gate.astype(np.float64)
    ref = g / (1.0 + np.exp(-g)) * up
    ops.silu_mul(gate, up, gate)
    assert rel_err(gate, ref) < REL_TOL


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("n,f", [(1, 5), (3, 173), (20, 5632)])
def test_gelu_tanh_mul_matches_torch(n, f, n_threads):
    """GeGLU against torch's gelu(approximate="tanh") (float64), the activation Gemma uses."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(f + 1)
    gate, up = randn(rng, n, f, scale=4.0), randn(rng, n, f)
    gate.flat[:4] = [-100.0, 100.0, -12.0, 1e-3]  # saturation and the linear region
    out = poisoned((n, f))
    ops.gelu_tanh_mul(gate, up, out, n_threads)
    ref = torch.nn.functional.gelu(torch.from_numpy(gate.astype(np.float64)), approximate="tanh").numpy() * up
    # the far negative tail (gelu < 1e-7 of the largest output) is e^(-2u) with a float32 u: there
    # the rounding of u is amplified ~|2u| times, and torch's own 1 + tanh(u) cancels
    atol = 1e-7 * np.abs(ref).max()
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=atol)
    ops.gelu_tanh_mul(gate, up, gate)     # in place
    np.testing.assert_allclose(gate, ref, rtol=2e-6, atol=atol)


@pytest.mark.parametrize("cap", [0.5, 30.0, 50.0])
def test_softcap(cap):
    """cap * tanh(x / cap) over small (|x/cap| < 1/4, the polynomial) and large arguments."""
    rng = np.random.default_rng(int(cap * 10))
    x = np.concatenate([randn(rng, 1001, scale=cap * 0.1), randn(rng, 999, scale=cap * 3),
                        np.array([0.0, -0.0, 1e-30, cap * 0.25, -cap * 0.25, 1e30, -1e30], np.float32)])
    ref = cap * np.tanh(x.astype(np.float64) / cap)
    ops.softcap(x, cap)
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 33)])
def test_add_inplace(shape):
    rng = np.random.default_rng(3)
    x, y = randn(rng, *shape), randn(rng, *shape)
    ref = x.astype(np.float64) + y
    ops.add_inplace(x, y)
    np.testing.assert_allclose(x, ref, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("d", [1, 13, 32000])
def test_softmax_rows(d):
    rng = np.random.default_rng(d)
    x = randn(rng, 4, d, scale=5.0)
    if d > 1:
        x[1, ::3] = -np.inf  # masked logits
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=1, keepdims=True))
    ref = e / e.sum(axis=1, keepdims=True)
    ops.softmax_rows(x)
    np.testing.assert_allclose(x, ref, rtol=2e-6, atol=1e-12)
    if d > 1:
        assert np.all(x[1, ::3] == 0.0)


def test_argmax_rows():
    rng = np.random.default_rng(4)
    x = randn(rng, 6, 1000)
    x[2, 10] = x[2, 500] = 50.0  # ties resolve to the first
    got = ops.argmax_rows(x)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=1))


# -- paged KV cache ----------------------------------------------------------------

def make_batch(rng, seqs, block_size, n_kv, hd, spare_blocks=3):
    """A varlen batch over a shuffled block pool.

    seqs: (context_len, n_q) per sequence. Returns the caches (random, the
    whole pool), block_tables, context_lens, query_start_loc.
    """
    need = [-(-L // block_size) for L, _ in seqs]
    n_blocks = sum(need) + spare_blocks
    pool = rng.permutation(n_blocks).astype(np.int32)  # blocks scattered through the pool
    max_blocks = max(need) + 1
    tables = np.zeros((len(seqs), max_blocks), dtype=np.int32)
    start = 0
    for s, nb in enumerate(need):
        tables[s, :nb] = pool[start:start + nb]
        start += nb
    k_cache = randn(rng, n_blocks, n_kv, block_size, hd)     # the CPU layout: head-major blocks
    v_cache = randn(rng, n_blocks, n_kv, block_size, hd)
    context_lens = np.array([L for L, _ in seqs], dtype=np.int32)
    qsl = np.concatenate([[0], np.cumsum([nq for _, nq in seqs])]).astype(np.int32)
    return k_cache, v_cache, tables, context_lens, qsl


def gather_context(cache, table, L, block_size):
    """[L, n_kv, hd] float64: positions 0..L-1 of one sequence, in order."""
    p = np.arange(L)
    return cache[table[p // block_size], :, p % block_size].astype(np.float64)


def attention_ref(q, k_cache, v_cache, tables, context_lens, qsl, scale, window=0, softcap=0.0):
    """float64 causal GQA attention per sequence, from the definition; window > 0: a query at
    position p sees keys (p - window, p]; softcap > 0: scores become softcap * tanh(s / softcap)."""
    n_tok, n_heads, hd = q.shape
    n_kv, bs = k_cache.shape[1], k_cache.shape[2]
    out = np.zeros((n_tok, n_heads, hd))
    for s, L in enumerate(context_lens):
        rows = slice(qsl[s], qsl[s + 1])
        n_q = qsl[s + 1] - qsl[s]
        if n_q == 0:
            continue
        K = np.repeat(gather_context(k_cache, tables[s], L, bs), n_heads // n_kv, axis=1)  # [L, H, hd]
        V = np.repeat(gather_context(v_cache, tables[s], L, bs), n_heads // n_kv, axis=1)  # [L, H, hd]
        scores = np.einsum("qhd,khd->hqk", q[rows].astype(np.float64), K) * scale   # [H, n_q, L]
        if softcap:
            scores = softcap * np.tanh(scores / softcap)
        qpos = L - n_q + np.arange(n_q)
        scores[:, np.arange(L)[None, :] > qpos[:, None]] = -np.inf
        if window:
            scores[:, np.arange(L)[None, :] <= qpos[:, None] - window] = -np.inf
        w = np.exp(scores - scores.max(axis=-1, keepdims=True))
        w /= w.sum(axis=-1, keepdims=True)
        out[rows] = np.einsum("hqk,khd->qhd", w, V)
    return out


# decode rows (n_q = 1), a fresh prefill (n_q = L), prefill chunks after a
# cached prefix (L > n_q > 1), an empty sequence, lengths off block boundaries
MIXED = [(1, 1), (37, 1), (300, 1), (70, 70), (200, 45), (0, 0), (64, 1), (129, 17)]


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("hd,n_heads,n_kv", [(64, 8, 8), (64, 8, 2), (48, 8, 1), (64, 32, 4)])
def test_paged_attention(hd, n_heads, n_kv, block_size, n_threads):
    rng = np.random.default_rng(hd * 100 + n_heads * 10 + n_kv + block_size)
    k_cache, v_cache, tables, lens, qsl = make_batch(rng, MIXED, block_size, n_kv, hd)
    q = randn(rng, int(qsl[-1]), n_heads, hd)
    scale = 1.0 / np.sqrt(hd)
    out = poisoned(q.shape)
    ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, scale, out, n_threads)
    ref = attention_ref(q, k_cache, v_cache, tables, lens, qsl, scale)
    assert rel_err(out, ref) < REL_TOL


def test_paged_attention_peaked_scores_and_odd_head_dim():
    """Large logits (the online max must rescale), head_dim with a scalar tail."""
    rng = np.random.default_rng(11)
    hd = 20
    k_cache, v_cache, tables, lens, qsl = make_batch(rng, [(150, 1), (90, 30)], 16, 2, hd)
    q = randn(rng, int(qsl[-1]), 4, hd, scale=6.0)
    out = poisoned(q.shape)
    ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, 1.0, out, 2)
    ref = attention_ref(q, k_cache, v_cache, tables, lens, qsl, 1.0)
    assert rel_err(out, ref) < REL_TOL


def test_paged_attention_matches_torch_sdpa():
    """One sequence, prefill chunk after a cached prefix, against torch SDPA
    (float64) with an explicit boolean causal mask and GQA by repeat."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    L, n_q, n_heads, n_kv, hd, bs = 150, 40, 8, 2, 64, 16
    k_cache, v_cache, tables, lens, qsl = make_batch(rng, [(L, n_q)], bs, n_kv, hd)
    q = randn(rng, n_q, n_heads, hd)
    out = poisoned(q.shape)
    ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, 0.125, out, 2)

    K = torch.from_numpy(gather_context(k_cache, tables[0], L, bs)).repeat_interleave(n_heads // n_kv, dim=1)
    V = torch.from_numpy(gather_context(v_cache, tables[0], L, bs)).repeat_interleave(n_heads // n_kv, dim=1)
    Q = torch.from_numpy(q.astype(np.float64))
    mask = torch.arange(L)[None, :] <= (L - n_q + torch.arange(n_q))[:, None]  # [n_q, L] True = attend
    ref = torch.nn.functional.scaled_dot_product_attention(
        Q.transpose(0, 1), K.transpose(0, 1), V.transpose(0, 1), attn_mask=mask, scale=0.125
    ).transpose(0, 1)
    assert rel_err(out, ref.numpy()) < REL_TOL


# Prefill tiles: a sequence with several query rows is attended as tiles of
# consecutive rows x the heads of one kv head (native/ops_kernels.c); the
# per-row path stays for decode rows. PYFORGE_ATTN_TILES picks the path:
# unset = tiles on the widest kernels (AVX-512 where the CPU has it), "avx2" =
# tiles on the AVX2 kernels, "0" = every row on the per-row path.
TILE_PATHS = ["", "avx2", "0"]

# fresh prompts whose lengths are not multiples of any tile (ragged last
# tiles), chunked prefill after a cached context (query rows start mid-block
# and mid-chunk), tiny prompts (2-3 rows), and decode rows mixed in
TILED = [(37, 37), (150, 23), (2, 2), (300, 1), (77, 13), (3, 3), (129, 129), (64, 1)]


@pytest.mark.parametrize("path", TILE_PATHS)
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("hd", [16, 64, 128])
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (8, 4), (16, 2), (32, 4)])  # GQA groups 1, 2, 8, 8
def test_paged_attention_prefill_tiles(n_heads, n_kv, hd, n_threads, path, monkeypatch):
    monkeypatch.setenv("PYFORGE_ATTN_TILES", path)
    rng = np.random.default_rng(hd * 1000 + n_heads * 10 + n_kv)
    k_cache, v_cache, tables, lens, qsl = make_batch(rng, TILED, 16, n_kv, hd)
    q = randn(rng, int(qsl[-1]), n_heads, hd)
    scale = 1.0 / np.sqrt(hd)
    out = poisoned(q.shape)
    ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, scale, out, n_threads)
    assert rel_err(out, attention_ref(q, k_cache, v_cache, tables, lens, qsl, scale)) < REL_TOL


@pytest.mark.parametrize("path", TILE_PATHS)
@pytest.mark.parametrize("seqs,n_heads,n_kv", [
    ([(4, 4)], 8, 1),                 # one short prompt, 2 threads: tiles shrink to 2 then 1 row
    ([(70, 70)], 6, 2),               # GQA group 3: 3 heads x 10 rows, lanes padded to 32
    ([(40, 40), (90, 25)], 64, 1),    # group 64: tiles of 32 heads x 1 row
    ([(9, 9), (300, 5), (80, 3)], 2, 2),  # group 1: 9 and 5 rows tiled (5 of 8 lanes), 3 rows by rows
])
def test_paged_attention_tile_shapes(seqs, n_heads, n_kv, path, monkeypatch):
    monkeypatch.setenv("PYFORGE_ATTN_TILES", path)
    rng = np.random.default_rng(n_heads * 10 + n_kv)
    hd = 36  # dims in blocks of 8 plus a tail of 4
    k_cache, v_cache, tables, lens, qsl = make_batch(rng, seqs, 16, n_kv, hd)
    q = randn(rng, int(qsl[-1]), n_heads, hd)
    out = poisoned(q.shape)
    ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, 0.2, out, 2)
    assert rel_err(out, attention_ref(q, k_cache, v_cache, tables, lens, qsl, 0.2)) < REL_TOL


@pytest.mark.parametrize("path", TILE_PATHS)
def test_paged_attention_tiles_peaked_scores(path, monkeypatch):
    """Logits up to ~100 over several 64-position chunks, keys growing along
    the sequence: the running max of each lane grows chunk after chunk, so the
    output is rescaled many times. (Larger logits would test float32 itself:
    at 256 a logit is only good to 1.5e-5, which goes straight into its weight.)"""
    monkeypatch.setenv("PYFORGE_ATTN_TILES", path)
    rng = np.random.default_rng(14)
    hd, n_heads, n_kv, L = 64, 8, 2, 400
    k_cache, v_cache, tables, lens, qsl = make_batch(rng, [(L, 100)], 16, n_kv, hd)
    n_used = -(-L // 16)
    k_cache[tables[0, :n_used]] *= np.linspace(0.25, 2.0, n_used, dtype=np.float32)[:, None, None, None]
    q = randn(rng, 100, n_heads, hd, scale=2.0)
    out = poisoned(q.shape)
    ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, 1.0, out, 2)
    assert rel_err(out, attention_ref(q, k_cache, v_cache, tables, lens, qsl, 1.0)) < REL_TOL


# Sliding windows: shorter than a block, than a tile's rows, than a 64-position chunk, and
# longer than some contexts; a soft cap (Gemma 2) that bends scores of up to ~10.
@pytest.mark.parametrize("path", TILE_PATHS)
@pytest.mark.parametrize("window,softcap", [(1, 0.0), (5, 0.0), (40, 0.0), (100, 0.0), (0, 3.0), (37, 3.0)])
@pytest.mark.parametrize("n_heads,n_kv,hd", [(8, 2, 64), (4, 4, 36)])
def test_paged_attention_window_and_softcap(n_heads, n_kv, hd, window, softcap, path, monkeypatch):
    monkeypatch.setenv("PYFORGE_ATTN_TILES", path)
    rng = np.random.default_rng(window * 7 + n_heads)
    k_cache, v_cache, tables, lens, qsl = make_batch(rng, TILED + [(200, 45)], 16, n_kv, hd)
    q = randn(rng, int(qsl[-1]), n_heads, hd, scale=2.0 if softcap else 1.0)
    scale = 1.0 / np.sqrt(hd)
    out = poisoned(q.shape)
    ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, scale, out, 2, window, softcap)
    assert rel_err(out, attention_ref(q, k_cache, v_cache, tables, lens, qsl, scale, window, softcap)) < REL_TOL


def test_paged_attention_window_matches_torch_sdpa():
    """A prefill chunk after a cached prefix under a sliding window, against torch SDPA with
    transformers' sliding-window mask (a key is seen when q_pos - window < k_pos <= q_pos)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(16)
    L, n_q, n_heads, n_kv, hd, bs, window = 150, 60, 8, 2, 64, 16, 23
    k_cache, v_cache, tables, lens, qsl = make_batch(rng, [(L, n_q)], bs, n_kv, hd)
    q = randn(rng, n_q, n_heads, hd)
    out = poisoned(q.shape)
    ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, 0.125, out, 2, window)
    K = torch.from_numpy(gather_context(k_cache, tables[0], L, bs)).repeat_interleave(n_heads // n_kv, dim=1)
    V = torch.from_numpy(gather_context(v_cache, tables[0], L, bs)).repeat_interleave(n_heads // n_kv, dim=1)
    Q = torch.from_numpy(q.astype(np.float64))
    q_pos, k_pos = (L - n_q + torch.arange(n_q))[:, None], torch.arange(L)[None, :]
    mask = (k_pos <= q_pos) & (k_pos > q_pos - window)
    ref = torch.nn.functional.scaled_dot_product_attention(
        Q.transpose(0, 1), K.transpose(0, 1), V.transpose(0, 1), attn_mask=mask, scale=0.125
    ).transpose(0, 1)
    assert rel_err(out, ref.numpy()) < REL_TOL


@pytest.mark.parametrize("path", TILE_PATHS)
@pytest.mark.parametrize("kv_dtype,hd,n_heads,n_kv", [
    ("f32", 64, 32, 4), ("f32", 80, 8, 2), ("f32", 20, 4, 2),   # 16-lane vectors, + a tail, too short
    ("f16", 80, 8, 2), ("q8_0", 96, 8, 1),
])
def test_paged_attention_decode_rows_past_many_chunks(kv_dtype, hd, n_heads, n_kv, path, monkeypatch):
    """Decode rows (one query row each) over several 64-position chunks, each chunk
    fetched ahead while the one before computes; head sizes in whole 16-lane vectors,
    with a tail past the last one, and shorter than one; caches of each kind."""
    monkeypatch.setenv("PYFORGE_ATTN_TILES", path)
    rng = np.random.default_rng(hd + n_heads)
    k32, v32, tables, lens, qsl = make_batch(rng, [(333, 1), (64, 1), (130, 1)], 16, n_kv, hd)
    (k_cache, k_held), (v_cache, v_held) = stored_cache(k32, kv_dtype), stored_cache(v32, kv_dtype)
    q = randn(rng, int(qsl[-1]), n_heads, hd)
    out = poisoned(q.shape)
    ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, hd**-0.5, out, 2, kv_dtype=kv_dtype)
    assert rel_err(out, attention_ref(q, k_held, v_held, tables, lens, qsl, hd**-0.5)) < REL_TOL


def has_avx512f():
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f " in line + " " for line in f)
    except OSError:
        return False


@pytest.mark.skipif(not has_avx512f(), reason="no AVX-512F: decode rows have one path")
def test_paged_attention_decode_rows_run_on_16_lane_vectors(monkeypatch):
    """Decode rows on AVX-512 hosts sum in 16 lanes, not 8: not the same bits as the
    AVX2 kernels (which would mean the wide ones never ran), the same to rounding."""
    rng = np.random.default_rng(17)
    k_cache, v_cache, tables, lens, qsl = make_batch(rng, [(300, 1), (90, 1)], 16, 4, 64)
    q = randn(rng, 2, 32, 64)
    outs = {}
    for path in ("", "avx2"):
        monkeypatch.setenv("PYFORGE_ATTN_TILES", path)
        outs[path] = poisoned(q.shape)
        ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, 0.125, outs[path], 2)
    assert not np.array_equal(outs[""], outs["avx2"])
    np.testing.assert_allclose(outs[""], outs["avx2"], rtol=0, atol=1e-5 * np.abs(outs["avx2"]).max())


def test_paged_attention_tiles_are_a_different_path(monkeypatch):
    """The tiled and per-row paths agree to rounding but sum in different
    orders: identical bits would mean the tiles never ran."""
    rng = np.random.default_rng(15)
    k_cache, v_cache, tables, lens, qsl = make_batch(rng, [(200, 64)], 16, 4, 64)
    q = randn(rng, 64, 32, 64)
    outs = {}
    for path in TILE_PATHS:
        monkeypatch.setenv("PYFORGE_ATTN_TILES", path)
        outs[path] = poisoned(q.shape)
        ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, 0.125, outs[path], 2)
    assert not np.array_equal(outs[""], outs["0"])
    assert not np.array_equal(outs["avx2"], outs["0"])
    np.testing.assert_allclose(outs[""], outs["0"], rtol=0, atol=1e-5 * np.abs(outs["0"]).max())


@pytest.mark.parametrize("block_size", [16, 32])
def test_kv_store_then_attention(block_size):
    """kv_store writes exactly the mapped slots; attention then reads them back."""
    rng = np.random.default_rng(13)
    n_kv, hd, n_heads = 2, 64, 8
    k_cache, v_cache, tables, lens, qsl = make_batch(rng, [(40, 1), (33, 33), (100, 7)], block_size, n_kv, hd)
    # the new tokens of each sequence: its last n_q positions
    slots = np.concatenate([
        tables[s, p // block_size] * block_size + p % block_size
        for s in range(len(lens))
        for p in [np.arange(lens[s] - (qsl[s + 1] - qsl[s]), lens[s])]
    ]).astype(np.int32)
    n_tok = len(slots)
    k, v = randn(rng, n_tok, n_kv, hd), randn(rng, n_tok, n_kv, hd)
    k_ref, v_ref = k_cache.copy(), v_cache.copy()
    k_ref[slots // block_size, :, slots % block_size] = k     # [n_blocks, n_kv, block_size, hd]
    v_ref[slots // block_size, :, slots % block_size] = v
    ops.kv_store(k, v, k_cache, v_cache, slots)
    np.testing.assert_array_equal(k_cache, k_ref)
    np.testing.assert_array_equal(v_cache, v_ref)

    q = randn(rng, n_tok, n_heads, hd)
    out = poisoned(q.shape)
    ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, 0.125, out, 2)
    assert rel_err(out, attention_ref(q, k_cache, v_cache, tables, lens, qsl, 0.125)) < REL_TOL


# -- KV cache dtypes ---------------------------------------------------------------

KV_DTYPES = ["f32", "f16", "bf16", "q8_0"]

# Attention over a stored cache against float64 attention over the float32 inputs it
# was stored from: the storage rounding is the whole error. Per value that is at most
# half a unit in the last place (f16 2^-11 = 4.9e-4, bf16 2^-8 = 3.9e-3) or half a
# q8_0 step (amax / 254 of its block: ~1e-2 of a Gaussian's rms); the output, a
# weighted mean, errs less. Bounds at about 2x what random inputs show.
KV_STORAGE_TOL = {"f32": REL_TOL, "f16": 1e-3, "bf16": 8e-3, "q8_0": 1.5e-2}


def torch_bf16_bits(x):
    torch = pytest.importorskip("torch")
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def external_encode(x, kv_dtype):
    """x [n, hd] float32 as the cache stores it, by the external references:
    numpy's float16 cast, torch's bfloat16 cast, the gguf package's Q8_0 quantizer."""
    if kv_dtype == "f32":
        return x.copy()
    if kv_dtype == "f16":
        return x.astype(np.float16)
    if kv_dtype == "bf16":
        return torch_bf16_bits(x)
    gguf = pytest.importorskip("gguf")
    return gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).view(np.uint8)


def external_decode(rows, kv_dtype, hd):
    """float64 [n, hd] of stored rows, by the external references."""
    if kv_dtype in ("f32", "f16"):
        return rows.astype(np.float64)
    if kv_dtype == "bf16":
        return (rows.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    gguf = pytest.importorskip("gguf")
    return gguf.quants.dequantize(rows, gguf.GGMLQuantizationType.Q8_0).reshape(-1, hd).astype(np.float64)


def stored_cache(cache, kv_dtype):
    """A float32 cache [n_blocks, n_kv, bs, hd] stored as kv_dtype, and what it holds as float64."""
    n_blocks, n_kv, bs, hd = cache.shape
    shape, _ = ops.kv_cache_shape(n_blocks, n_kv, bs, hd, kv_dtype)
    rows = ops.kv_encode(cache.reshape(-1, hd), kv_dtype)
    return rows.reshape(shape), external_decode(rows, kv_dtype, hd).reshape(cache.shape)


@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("hd", [32, 64, 96, 128])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_kv_encode_matches_external_references(kv_dtype, hd, scalar):
    """Stored bytes equal numpy's / torch's / gguf's, SIMD and scalar alike (values
    at rounding ties, subnormal halves, f16 overflow to inf, zero q8_0 blocks)."""
    rng = np.random.default_rng(hd)
    x = randn(rng, 40, hd, scale=3.0)
    x[0] = 0.0                                     # a zero block: q8_0 scale 0
    x[1, :8] = [1e-6, -3e-7, 6e-8, 65519.0, 65520.0, -7e4, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11]
    x[2, :4] = [1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, -(1 + 2.0 ** -8), 2.0 ** -130]  # bf16 ties, a subnormal
    if kv_dtype in ("bf16", "q8_0"):
        x[1, 3:6] = 0.5                            # no f16 overflow values outside the f16 case
    got = ops.kv_encode(x, kv_dtype, scalar=scalar)
    with np.errstate(over="ignore"):
        want = external_encode(x, kv_dtype)
    assert got.shape[1] * got.itemsize == ops.kv_row_bytes(kv_dtype, hd)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    decoded = ops.kv_decode(got, kv_dtype, hd, scalar=scalar)
    np.testing.assert_array_equal(decoded, external_decode(got, kv_dtype, hd).astype(np.float32))


def test_kv_row_bytes_and_bad_dtypes():
    assert [ops.kv_row_bytes(d, 128) for d in KV_DTYPES] == [512, 256, 256, 136]
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.kv_row_bytes("q8_0", 48)
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        ops.kv_row_bytes("f8", 64)


@pytest.mark.parametrize("path", TILE_PATHS)
@pytest.mark.parametrize("n_heads,n_kv,hd", [(8, 2, 64), (4, 4, 32), (16, 2, 128)])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_paged_attention_kv_dtypes(kv_dtype, n_heads, n_kv, hd, path, monkeypatch):
    """Each dtype on the tiled, AVX2-tiled and per-row paths: to float32 rounding
    of what the cache holds (decoded by the external references), and within the
    dtype's storage error of float64 attention over the unrounded inputs."""
    monkeypatch.setenv("PYFORGE_ATTN_TILES", path)
    rng = np.random.default_rng(hd + n_heads)
    k32, v32, tables, lens, qsl = make_batch(rng, TILED + MIXED, 16, n_kv, hd)
    (k_cache, k_held), (v_cache, v_held) = stored_cache(k32, kv_dtype), stored_cache(v32, kv_dtype)
    q = randn(rng, int(qsl[-1]), n_heads, hd)
    scale = 1.0 / np.sqrt(hd)
    out = poisoned(q.shape)
    ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, scale, out, 2, kv_dtype=kv_dtype)
    assert rel_err(out, attention_ref(q, k_held, v_held, tables, lens, qsl, scale)) < REL_TOL
    assert rel_err(out, attention_ref(q, k32, v32, tables, lens, qsl, scale)) < KV_STORAGE_TOL[kv_dtype]


@pytest.mark.parametrize("kv_dtype", ["f16", "q8_0"])
def test_paged_attention_kv_dtype_window_and_softcap(kv_dtype):
    rng = np.random.default_rng(21)
    k32, v32, tables, lens, qsl = make_batch(rng, TILED, 16, 2, 64)
    (k_cache, k_held), (v_cache, v_held) = stored_cache(k32, kv_dtype), stored_cache(v32, kv_dtype)
    q = randn(rng, int(qsl[-1]), 8, 64, scale=2.0)
    out = poisoned(q.shape)
    ops.paged_attention(q, k_cache, v_cache, tables, lens, qsl, 0.125, out, 2, 37, 3.0, kv_dtype)
    assert rel_err(out, attention_ref(q, k_held, v_held, tables, lens, qsl, 0.125, 37, 3.0)) < REL_TOL


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_kv_store_kv_dtypes(kv_dtype):
    """kv_store writes the mapped slots as the external encoders do, and nothing else."""
    rng = np.random.default_rng(22)
    n_kv, hd, bs, n_blocks = 2, 64, 16, 5
    shape, dtype = ops.kv_cache_shape(n_blocks, n_kv, bs, hd, kv_dtype)
    k_cache, v_cache = np.zeros(shape, dtype), np.zeros(shape, dtype)
    slots = rng.permutation(n_blocks * bs)[:23].astype(np.int32)
    k, v = randn(rng, 23, n_kv, hd), randn(rng, 23, n_kv, hd)
    ops.kv_store(k, v, k_cache, v_cache, slots, kv_dtype)
    for cache, x in ((k_cache, k), (v_cache, v)):
        want = np.zeros(shape, dtype)
        want[slots // bs, :, slots % bs] = external_encode(x.reshape(-1, hd), kv_dtype).reshape(23, n_kv, -1)
        np.testing.assert_array_equal(cache.view(np.uint8), want.view(np.uint8))


def test_bad_kv_dtype_inputs():
    k, slots = f32(2, 2, 64), i32(0, 1)
    shape, dtype = ops.kv_cache_shape(3, 2, 4, 64, "f16")
    cache = np.zeros(shape, dtype)
    with pytest.raises(ValueError, match="float16"):
        ops.kv_store(k, k, f32(3, 2, 4, 64), f32(3, 2, 4, 64), slots, "f16")   # f32 arrays as f16
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        ops.kv_store(k, k, cache, cache.copy(), slots, "fp8_e4m3")
    q8 = np.zeros(ops.kv_cache_shape(3, 2, 4, 64, "q8_0")[0], np.uint8)
    with pytest.raises(ValueError, match="does not hold"):
        ops.kv_store(f32(2, 2, 32), f32(2, 2, 32), q8, q8.copy(), slots, "q8_0")  # rows of 64, k of 32
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.kv_store(f32(2, 2, 48), f32(2, 2, 48), q8, q8.copy(), slots, "q8_0")
    q = f32(1, 4, 64)
    with pytest.raises(ValueError, match="float16"):
        ops.paged_attention(q, cache, cache, i32(0).reshape(1, 1), i32(1), i32(0, 1), 0.1, f32(1, 4, 64), 1,
                            kv_dtype="bf16")


# -- bad inputs --------------------------------------------------------------------

def f32(*shape):
    return np.zeros(shape, dtype=np.float32)


def i32(*values):
    return np.array(values, dtype=np.int32)


def test_bad_elementwise_inputs():
    x, w = f32(2, 8), f32(8)
    with pytest.raises(ValueError):
        ops.rmsnorm(x.astype(np.float64), w, 1e-5, f32(2, 8))  # dtype
    with pytest.raises(ValueError):
        ops.rmsnorm(x, f32(7), 1e-5, f32(2, 8))  # weight length
    with pytest.raises(ValueError):
        ops.rmsnorm(np.zeros((8, 2), np.float32).T, w, 1e-5, f32(2, 8))  # not contiguous
    with pytest.raises(ValueError):
        ops.rmsnorm(x, w, 1e-5, f32(2, 8), 0)  # n_threads
    ro = f32(2, 8)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        ops.rmsnorm(x, w, 1e-5, ro)  # read-only out
    with pytest.raises(ValueError):
        ops.silu_mul(x, f32(2, 9), f32(2, 8))
    with pytest.raises(ValueError):
        ops.add_inplace(f32(3), f32(4))
    with pytest.raises(ValueError):
        ops.add_inplace([1.0], f32(1))
    with pytest.raises(ValueError):
        ops.softmax_rows(f32(8))


def test_bad_rope_inputs():
    x = f32(3, 2, 8)
    with pytest.raises(ValueError):
        ops.rope(x, i32(0, 1), 8, 1e4, False)  # positions length
    with pytest.raises(ValueError):
        ops.rope(x, np.zeros(3, np.int64), 8, 1e4, False)  # positions dtype
    for n_rot in (0, 7, 10):
        with pytest.raises(ValueError):
            ops.rope(x, i32(0, 1, 2), n_rot, 1e4, False)
    with pytest.raises(ValueError):
        ops.rope(x, i32(0, 1, 2), 8, 1e4, False, f32(3))  # freq_factors length


def test_bad_kv_store_inputs():
    k, cache = f32(2, 2, 8), f32(3, 2, 4, 8)  # 12 slots
    with pytest.raises(ValueError):
        ops.kv_store(k, k, cache, f32(3, 2, 4, 8), i32(0, 12))  # slot out of range
    with pytest.raises(ValueError):
        ops.kv_store(k, k, cache, f32(3, 2, 4, 8), i32(-1, 0))
    with pytest.raises(ValueError):
        ops.kv_store(k, k, f32(3, 4, 1, 8), f32(3, 4, 1, 8), i32(0, 1))  # n_kv mismatch
    with pytest.raises(ValueError):
        ops.kv_store(k, k, cache, f32(3, 2, 4, 8), i32(0))  # slot_mapping length


def test_bad_attention_inputs():
    cache = f32(4, 2, 16, 8)     # [n_blocks, n_kv, block_size, hd]
    q, out = f32(3, 4, 8), f32(3, 4, 8)
    good = dict(block_tables=i32(0, 1).reshape(1, 2), context_lens=i32(20), query_start_loc=i32(0, 3))

    def call(**kw):
        a = {**good, **kw}
        ops.paged_attention(kw.get("q", q), cache, cache, a["block_tables"], a["context_lens"],
                            a["query_start_loc"], 0.3, kw.get("out", out))

    call()  # the good batch passes
    bad = [
        dict(query_start_loc=i32(0, 2)),                      # does not end at n_tok
        dict(query_start_loc=i32(1, 3)),                      # does not start at 0
        dict(context_lens=i32(2)),                            # shorter than its 3 query rows
        dict(context_lens=i32(40)),                           # needs 3 blocks, table has 2
        dict(block_tables=i32(0, 4).reshape(1, 2)),           # block id out of range
        dict(block_tables=i32(-1, 0).reshape(1, 2)),
        dict(context_lens=i32(20, 20)),                       # n_seq mismatch
        dict(block_tables=np.zeros((1, 2), np.int64)),        # dtype
        dict(q=f32(3, 3, 8), out=f32(3, 3, 8)),               # 3 heads over 2 kv heads
        dict(q=f32(3, 4, 16), out=f32(3, 4, 16)),             # head_dim mismatch
        dict(out=f32(3, 4, 7)),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            call(**kw)
    two = dict(block_tables=i32(0, 1, 2, 3).reshape(2, 2), context_lens=i32(20, 20))
    with pytest.raises(ValueError):
        call(**two, query_start_loc=i32(0, 4, 3))  # decreasing
    args = (q, cache, cache, good["block_tables"], good["context_lens"], good["query_start_loc"], 0.3, out, 1)
    for window, softcap in ((-1, 0.0), (2.5, 0.0), (True, 0.0), (0, -1.0), (0, float("inf")), (0, float("nan"))):
        with pytest.raises(ValueError, match="window|softcap"):
            ops.paged_attention(*args, window, softcap)
    with pytest.raises(ValueError):
        ops.gelu_tanh_mul(f32(2, 8), f32(2, 9), f32(2, 8))
    for cap in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="cap"):
            ops.softcap(f32(4), cap)
