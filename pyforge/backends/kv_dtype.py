"""KV cache element types (--kv-cache-dtype): the names, which backend stores
which, bytes per value, and what `auto` means on each backend.

cpu  f32 | f16 | bf16 | q8_0 (ggml's block_q8_0: 34 bytes per 32 values);
     auto = f32: f16's logits are ~1.4e-4 from transformers' float32 ones, over the
     reference tests' 1e-4, and its speed measured at parity (benchmarks/RESULTS.md,
     "KV cache dtypes"); f16 halves the memory per token, q8_0 takes 0.27x.
cuda f16 (auto) | fp8_e4m3 (1 byte a value, per-kv-head scales; backends/cuda.py Fp8KvPool).
"""
KV_CACHE_DTYPES = ("auto", "f32", "f16", "bf16", "q8_0", "fp8_e4m3")
ALIASES = {"f8e4m3": "fp8_e4m3", "fp8": "fp8_e4m3", "fp16": "f16", "fp32": "f32"}  # LLM_PAGED_CACHE_TYPE's spellings
BACKEND_KV_DTYPES = {"cpu": ("f32", "f16", "bf16", "q8_0"), "cuda": ("f16", "fp8_e4m3")}
AUTO = {"cpu": "f32", "cuda": "f16"}
BYTES_PER_VALUE = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "fp8_e4m3": 1}


def normalize(name):
    """The canonical name of a --kv-cache-dtype value (aliases resolved), or ValueError."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} "
                         f"(or {', '.join(ALIASES)}), got {name!r}")
    return key


def resolve(name, backend):
    """The dtype backend `backend` stores for --kv-cache-dtype `name`, or ValueError
    naming what it does store."""
    key = normalize(name)
    if key == "auto":
        return AUTO[backend]
    if key not in BACKEND_KV_DTYPES[backend]:
        raise ValueError(f"kv_cache_dtype {key} is not available on the {backend} backend "
                         f"(it stores {', '.join(BACKEND_KV_DTYPES[backend])}, or auto)")
    return key


def bytes_per_token(n_layers, n_kv_heads, head_dim, kv_dtype):
    """Bytes one cached token takes: K and V of every layer and kv head."""
    return int(2 * n_layers * n_kv_heads * head_dim * BYTES_PER_VALUE[kv_dtype])
