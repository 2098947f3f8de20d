"""KV cache element types (--kv-cache-dtype): the names, which backend stores
which, bytes per value, and what `auto` means on each backend.

cpu  f32 | f16 | bf16 | q8_0 (ggml's block_q8_0: 34 bytes per 32 values);
     auto = the model's own float type, as vLLM's auto: f32 for F32 weights (and
     without a model), bf16 for BF16, f16 for F16 and quantized weights (llama.cpp's
     default cache). f16 halves the memory per token and reads faster at long
     context (TinyLlama, 2000 positions, Zen 5: 3.9 vs 4.4 ms a step of attention);
     q8_0 takes 0.27x of f32.
cuda f16 (auto) | fp8_e4m3 (1 byte a value, per-kv-head scales; backends/cuda.py Fp8KvPool).
"""
from collections import Counter

from pyforge.ggml_types import GGMLType

KV_CACHE_DTYPES = ("auto", "f32", "f16", "bf16", "q8_0", "fp8_e4m3")
ALIASES = {"f8e4m3": "fp8_e4m3", "fp8": "fp8_e4m3", "fp16": "f16", "fp32": "f32"}  # LLM_PAGED_CACHE_TYPE's spellings
BACKEND_KV_DTYPES = {"cpu": ("f32", "f16", "bf16", "q8_0"), "cuda": ("f16", "fp8_e4m3")}
AUTO = {"cuda": "f16"}      # cpu: auto_cpu, by the model's weights
BYTES_PER_VALUE = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "fp8_e4m3": 1}


def normalize(name):
    """The canonical name of a --kv-cache-dtype value (aliases resolved), or ValueError."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} "
                         f"(or {', '.join(ALIASES)}), got {name!r}")
    return key


def auto_cpu(weight_type=None):
    """What auto means on the CPU for a model whose matrices are mostly weight_type (a
    GGMLType; None: no model at hand)."""
    if weight_type is None or weight_type == GGMLType.F32:
        return "f32"
    return "bf16" if weight_type == GGMLType.BF16 else "f16"


def model_weight_type(tensors, types=None):
    """The type holding most of a model's layer matrices: tensors {name: TensorRef}, types
    {name: GGMLType} where --quantization changes them (loader/quantize.py loaded_types)."""
    counts = Counter()
    for name, ref in tensors.items():
        if name.startswith("blk.") and len(ref.shape) == 2:
            counts[(types or {}).get(name, ref.ggml_type)] += ref.shape[0] * ref.shape[1]
    return counts.most_common(1)[0][0] if counts else None


def resolve(name, backend, weight_type=None):
    """The dtype backend `backend` stores for --kv-cache-dtype `name` (auto: by weight_type,
    the model's, on the CPU), or ValueError naming what it does store."""
    key = normalize(name)
    if key == "auto":
        return auto_cpu(weight_type) if backend == "cpu" else AUTO[backend]
    if key not in BACKEND_KV_DTYPES[backend]:
        raise ValueError(f"kv_cache_dtype {key} is not available on the {backend} backend "
                         f"(it stores {', '.join(BACKEND_KV_DTYPES[backend])}, or auto)")
    return key


def bytes_per_token(n_layers, n_kv_heads, head_dim, kv_dtype):
    """Bytes one cached token takes: K and V of every layer and kv head."""
    return int(2 * n_layers * n_kv_heads * head_dim * BYTES_PER_VALUE[kv_dtype])
