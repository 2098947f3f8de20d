"""The memory budget's count of a weight's resident bytes (pyforge/serving/memory.py)."""
import numpy as np

from pyforge.ggml_types import GGMLType as T, tensor_bytes
from pyforge.loader import TensorRef
from pyforge.serving import memory


def ref(name, ggml_type, shape):
    return TensorRef(name, ggml_type, shape, np.zeros(1, np.uint8))


def test_repacked_copies_are_counted_where_the_backend_makes_them(monkeypatch):
    """A matrix with an x16 layout counts twice where the backend repacks (the mapped original
    stays in the page cache, or is kept for single tokens), once where it does not; an expert
    of a type kept as stored for single tokens is not repacked at all (CpuBackend.prepare_experts)."""
    monkeypatch.setattr("pyforge.backends.cpu.single_token_originals", lambda: (T.Q6_K,))
    shape, size = (256, 512), tensor_bytes(T.Q6_K, (256, 512))
    dense, expert = ref("blk.0.ffn_down.weight", T.Q6_K, shape), ref("blk.0.ffn_down.3.weight", T.Q6_K, shape)
    assert memory._resident_bytes(dense, T.Q6_K, repacks=True) == 2 * size
    assert memory._resident_bytes(expert, T.Q6_K, repacks=True) == size
    assert memory._resident_bytes(dense, T.Q6_K, repacks=False) == size
    q4 = ref("blk.0.ffn_gate.3.weight", T.Q4_K, shape)
    assert memory._resident_bytes(q4, T.Q4_K, repacks=True) == 2 * tensor_bytes(T.Q4_K, shape)
    wide_f32 = ref("blk.0.attn_q.weight", T.F32, (64, 1024))       # F32 repacks up to 512 columns only
    assert memory._resident_bytes(wide_f32, T.F32, repacks=True) == tensor_bytes(T.F32, (64, 1024))
    narrow_f32 = ref("blk.0.attn_q.weight", T.F32, (64, 64))
    assert memory._resident_bytes(narrow_f32, T.F32, repacks=True) == 2 * tensor_bytes(T.F32, (64, 64))
