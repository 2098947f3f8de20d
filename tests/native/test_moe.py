"""quant.moe_ffn (routed experts, tokens grouped by expert) against a float64 numpy
reference over the gguf package's dequantized weights, with the experts as stored and
repacked 16 rows at a time (quant.ExpertTable); routing against torch."""
import numpy as np
import pytest

from conftest import require_module
from pyforge.backends.routing import route_top_k
from pyforge.ggml_types import GGMLType as T
from pyforge.native import quant
from pyforge.synthetic import quantize

gguf = pytest.importorskip("gguf")

D, N_FF, N_EXPERTS = 256, 256, 6     # K-quant rows: multiples of 256
# activation quantization (Q8_0 / Q8_K) explains the quantized types' error; dense ones are exact
TOLERANCE = {T.F32: 1e-5, T.F16: 1e-5, T.BF16: 1e-5, T.Q8_0: 2e-2, T.Q4_0: 2e-2, T.Q4_K: 2e-2, T.Q6_K: 2e-2}


def make_experts(rng, types):
    """[(gate, up, down)] stored as (bytes, type) and the gguf-dequantized float64 matrices."""
    stored, dense = [], []
    for e in range(N_EXPERTS):
        mats, values = [], []
        for (rows, cols), t in zip(((N_FF, D), (N_FF, D), (D, N_FF)), types[e % len(types)]):
            w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
            data = quantize(w, t)
            raw = data.view(np.uint8) if t == T.BF16 else data
            values.append(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(t))).astype(np.float64)
                          .reshape(rows, cols))
            mats.append((data, int(t)))
        stored.append(tuple(mats))
        dense.append(values)
    return stored, dense


def reference(x, ids, weights, dense):
    x = x.astype(np.float64)
    out = np.zeros_like(x)
    for t in range(len(x)):
        for e, w in zip(ids[t], weights[t]):
            gate, up, down = dense[e]
            g, u = gate @ x[t], up @ x[t]
            out[t] += w * (down @ (g / (1 + np.exp(-g)) * u))
    return out


def routed(rng, n_tok, k):
    """Distinct experts per token, half the tokens on expert 0 (a large group), expert 5 never picked."""
    ids = np.array([rng.permutation(N_EXPERTS - 1)[:k] for _ in range(n_tok)], dtype=np.int32)
    ids[::2, 0] = np.where((ids[::2] == 0).any(axis=1), ids[::2, 0], 0)
    weights = rng.uniform(0.1, 1.0, (n_tok, k)).astype(np.float32)
    return ids, weights


MIXED = [(T.Q4_K, T.Q4_K, T.Q6_K), (T.Q8_0, T.F16, T.F32)]     # expert by expert, matrix by matrix


needs_x16 = pytest.mark.skipif(quant.x16_kernels() is None, reason="no x16 kernels here (or PYFORGE_DISABLE_X16)")


@pytest.mark.parametrize("layout", ["stored", "scalar", pytest.param("repacked", marks=needs_x16)])
@pytest.mark.parametrize("types", [[(t, t, t)] for t in TOLERANCE] + [MIXED],
                         ids=lambda v: "-".join(t.name for t in v[-1]) + ("-mixed" if len(v) > 1 else ""))
@pytest.mark.parametrize("n_tok,k", [(1, 2), (37, 3)])
def test_moe_ffn_matches_reference(types, n_tok, k, layout):
    """Stored (SIMD kernels), stored through the scalar reference kernels, and repacked for
    every type with an x16 layout (the others stay stored beside them)."""
    rng = np.random.default_rng(n_tok * 7 + k)
    stored, dense = make_experts(rng, types)
    table = quant.ExpertTable(stored, N_FF, D, repack=list(T) if layout == "repacked" else ())
    if layout == "repacked":    # each matrix whose type and shape have an x16 layout
        assert table.n_repacked == sum(quant.x16_layout(int(t), *shape) for e in range(N_EXPERTS)
                                       for t, shape in zip(types[e % len(types)], ((N_FF, D), (N_FF, D), (D, N_FF))))
    x = rng.standard_normal((n_tok, D)).astype(np.float32)
    ids, weights = routed(rng, n_tok, k)
    out = np.full((n_tok, D), np.nan, np.float32)
    quant.moe_ffn(x, ids, weights, table, out, 2, simd=layout != "scalar")
    ref = reference(x, ids, weights, dense)
    tol = max(TOLERANCE[t] for triple in types for t in triple)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < tol


@needs_x16
def test_repacked_experts_give_the_x16_matmuls_bits():
    """A repacked expert computes what quant.matmul_x16 computes on its matrices (the same
    tiles), and the table repacks exactly the types asked for."""
    rng = np.random.default_rng(3)
    stored, _ = make_experts(rng, [(T.Q4_K, T.Q8_0, T.Q6_K)])
    table = quant.ExpertTable(stored, N_FF, D, repack=[T.Q4_K, T.Q8_0])
    assert table.n_repacked == 2 * N_EXPERTS
    x = rng.standard_normal((1, D)).astype(np.float32)
    out = np.empty_like(x)
    quant.moe_ffn(x, np.array([[4]], np.int32), np.array([[0.5]], np.float32), table, out, 1)
    (gate, t_g), (up, t_u), (down, t_d) = stored[4]
    g, u, y = np.empty((1, N_FF), np.float32), np.empty((1, N_FF), np.float32), np.empty((1, D), np.float32)
    quant.matmul_x16(x, quant.repack_x16(gate, t_g, N_FF, D), t_g, N_FF, g, 1)
    quant.matmul_x16(x, quant.repack_x16(up, t_u, N_FF, D), t_u, N_FF, u, 1)
    act = (g * u / (1 + np.exp(-g))).astype(np.float32)
    quant.matmul(act, down, t_d, D, y, 1)
    np.testing.assert_allclose(out, 0.5 * y, rtol=1e-5, atol=1e-6)


def test_moe_ffn_rejects_bad_input():
    rng = np.random.default_rng(0)
    stored, _ = make_experts(rng, [(T.F16, T.F16, T.F16)])
    x = rng.standard_normal((3, D)).astype(np.float32)
    ids, weights = routed(rng, 3, 2)
    out = np.empty_like(x)
    bad_ids = ids.copy()
    bad_ids[1, 0] = N_EXPERTS
    table = quant.ExpertTable(stored, N_FF, D)
    with pytest.raises(ValueError, match="ids must be in 0..5"):
        quant.moe_ffn(x, bad_ids, weights, table, out, 1)
    with pytest.raises(ValueError, match="ids must be int32"):
        quant.moe_ffn(x, ids.astype(np.int64), weights, table, out, 1)
    with pytest.raises(ValueError, match="weights must have the shape of ids"):
        quant.moe_ffn(x, ids, weights[:, :1].copy(), table, out, 1)
    short = list(stored)
    short[2] = (stored[2][0], stored[2][1], (stored[2][2][0][:-1], stored[2][2][1]))
    with pytest.raises(ValueError, match="expert 2 down must hold 256 rows"):
        quant.ExpertTable(short, N_FF, D)
    with pytest.raises(ValueError, match="out must not overlap x"):
        quant.moe_ffn(x, ids, weights, table, x, 1)
    with pytest.raises(ValueError, match="cannot serve"):
        quant.moe_ffn(x, ids, weights, quant.ExpertTable(stored[:1], N_FF, D), out, 1)
    with pytest.raises(ValueError, match="rows of 256"):
        quant.moe_ffn(x[:, :128].copy(), ids, weights, table, out[:, :128].copy(), 1)
    with pytest.raises(TypeError):
        quant.moe_ffn(x, ids, weights, stored, out, 1)


@pytest.mark.parametrize("normalize", [True, False])
def test_routing_matches_torch(normalize):
    torch = require_module("torch")
    logits = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    ids, weights = route_top_k(logits, 3, normalize)
    probs = torch.softmax(torch.tensor(logits), dim=-1)
    top, idx = torch.topk(probs, 3, dim=-1)
    if normalize:
        top = top / top.sum(dim=-1, keepdim=True)
    assert (ids == idx.numpy()).all() and ids.dtype == np.int32
    assert np.abs(weights - top.numpy()).max() < 1e-6


def test_routing_rejects_bad_k():
    with pytest.raises(ValueError, match="cannot pick 9 experts"):
        route_top_k(np.zeros((2, 8), np.float32), 9, True)
