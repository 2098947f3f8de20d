"""Random-weight models with real shapes and a real vocabulary, for tests and benchmarks.

The same (config, seed) gives the same weights in every container: a GGUF file
(llama.cpp layout: Q/K rows permuted for interleaved rope on arch llama) and a
Hugging Face folder (safetensors, rotate-half rope) represent one model.

    write_gguf("tiny-gqa", "m.gguf", "Q8_0", seed=0)
    write_hf_folder("tiny-qwen2", "folder", dtype="float32", seed=0)
    ensure_model("tinyllama-1.1b", "Q4_K_M")        # generated once, cached
    python -m pyforge.synthetic tinyllama-1.1b --format Q4_K_M --out m.gguf

Weights are N(0, 0.02^2) per tensor from an RNG seeded by (seed, tensor name);
norms are 1 + N(0, 0.05^2) (Gemma's HF files store them less 1, as its norms
multiply by 1 + w), biases N(0, 0.1^2). A family's fused tensors (Phi-3's qkv,
gate+up) are its parts' weights stacked, so fused and split files are one model;
likewise a MoE model's experts, merged in a GGUF as llama.cpp writes them (ffn_*_exps).
The "-copy" configs keep a config's shapes with weights whose greedy continuation follows
fixed token cycles (synthetic_copy.py).
Vocabulary: Llama 2's 32000 tokens (GGUF metadata from ggml-vocab-llama-spm.gguf,
tokenizer.json from TinyLlama-1.1B-Chat-v1.0). The `gguf` package is used here only
to write files.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pyforge.ggml_types import BLOCK_LAYOUT, GGMLType
from pyforge.loader.names import MERGED_EXPERTS, canonical_to_hf, expected_shapes, expert_matrix_shapes, fused_shapes
from pyforge.models.config import ModelConfig
from pyforge.models.registry import family
from pyforge.models.rope_scaling import longrope_attention_factor

VERSION = 1       # bump when generated weights change, so caches regenerate


def _cfg(**kw):
    kw.setdefault("n_rot", kw["head_dim"])
    kw.setdefault("rope_neox", True)     # the canonical (HF) weights are rotate-half
    return ModelConfig(**kw).validate()


_LLAMA = dict(arch="llama", vocab_size=32000, rms_eps=1e-5, rope_theta=10000.0, context_length=2048)
_GEMMA = dict(arch="gemma", vocab_size=32000, rms_eps=1e-6, rope_theta=10000.0, context_length=2048,
              tie_embeddings=True, embedding_scale=8.0)   # sqrt(hidden_size 64)
CONFIGS = {
    "tinyllama-1.1b": _cfg(**_LLAMA, hidden_size=2048, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64,
                           ffn_size=5632),
    # K-quant friendly (every row a multiple of 256) and still small
    "small-k": _cfg(**_LLAMA, hidden_size=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, ffn_size=768),
    "tiny-gqa": _cfg(**_LLAMA, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_size=128),
    "tiny-mha": _cfg(**_LLAMA, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, ffn_size=160),
    "tiny-qwen2": _cfg(arch="qwen2", vocab_size=32000, rms_eps=1e-6, rope_theta=1000000.0, context_length=2048,
                       hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_size=128,
                       tie_embeddings=True, attn_bias=True),
    "tiny-mistral": _cfg(arch="mistral", vocab_size=32000, rms_eps=1e-5, rope_theta=10000.0, context_length=2048,
                         hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_size=128,
                         sliding_window=24, sliding_layers=(0, 1)),
    # Gemma: MQA with head_dim != hidden / heads; Gemma 2 with windows on even layers, both soft caps
    # small enough to bend random-weight scores and logits, head_dim 32 (the CUDA kernels'); Gemma 3
    # with 5 of 6 layers windowed, q/k norms, a local rope base and linear scaling on the global layer
    "tiny-gemma": _cfg(**_GEMMA, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=32, ffn_size=128),
    "tiny-gemma2": _cfg(**{**_GEMMA, "arch": "gemma2"}, hidden_size=64, n_layers=4, n_heads=4, n_kv_heads=2,
                        head_dim=32, ffn_size=128, attention_scale=32 ** -0.5, sliding_window=24, sliding_layers=(0, 2),
                        attn_softcap=0.05, final_softcap=0.5),
    "tiny-gemma3": _cfg(**{**_GEMMA, "arch": "gemma3", "rope_theta": 1000000.0}, hidden_size=64, n_layers=6,
                        n_heads=4, n_kv_heads=2, head_dim=16, ffn_size=128, attention_scale=16 ** -0.5,
                        sliding_window=24, sliding_layers=(0, 1, 2, 3, 4), rope_theta_local=10000.0,
                        rope_scaling={"rope_type": "linear", "factor": 8.0}),
    # second configs: MHA; Gemma 2 with transformers' default caps, a query_pre_attn_scalar that is
    # not head_dim and window 7; Gemma 3 MQA, head_dim 32, its global layer first, no rope scaling
    "tiny-gemma-b": _cfg(**_GEMMA, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, ffn_size=96),
    "tiny-gemma2-b": _cfg(**{**_GEMMA, "arch": "gemma2"}, hidden_size=64, n_layers=4, n_heads=4, n_kv_heads=4,
                          head_dim=16, ffn_size=128, attention_scale=24 ** -0.5, sliding_window=7,
                          sliding_layers=(0, 2), attn_softcap=50.0, final_softcap=30.0),
    "tiny-gemma3-b": _cfg(**{**_GEMMA, "arch": "gemma3", "rope_theta": 1000000.0}, hidden_size=64, n_layers=3,
                          n_heads=4, n_kv_heads=1, head_dim=32, ffn_size=128, attention_scale=32 ** -0.5,
                          sliding_window=7, sliding_layers=(1, 2), rope_theta_local=10000.0),
    "tiny-llama3": _cfg(**{**_LLAMA, "rope_theta": 500000.0}, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=16, ffn_size=128,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
}
# One tiny model per family option: GQA and MHA, tied and untied heads, the family's options on and off.
_TINY = dict(vocab_size=32000, context_length=2048, hidden_size=64, n_layers=2, n_heads=4, head_dim=16, ffn_size=128)
_QWEN3 = dict(_TINY, arch="qwen3", rms_eps=1e-6, rope_theta=1000000.0)
_PHI3 = dict(_TINY, arch="phi3", rms_eps=1e-5, rope_theta=10000.0)
_GRANITE = dict(_TINY, arch="granite", rms_eps=1e-5, rope_theta=10000.0)
_OLMO2 = dict(_TINY, arch="olmo2", rms_eps=1e-6, rope_theta=500000.0)
_SMOLLM3 = dict(_TINY, arch="smollm3", rms_eps=1e-6, rope_theta=5000000.0, n_layers=4)
_STABLELM = dict(_TINY, arch="stablelm", rms_eps=1e-5, rope_theta=10000.0)
_GLM4 = dict(_TINY, arch="glm4", rms_eps=1e-5, rope_theta=10000.0, rope_neox=False, attn_bias=True)
_MIXTRAL = dict(_TINY, arch="mixtral", rms_eps=1e-5, rope_theta=1000000.0, expert_ffn_size=_TINY["ffn_size"])
_QWEN3_MOE = dict(_TINY, arch="qwen3moe", rms_eps=1e-6, rope_theta=1000000.0)


def _longrope_factors(n, top):
    """n per-frequency longrope divisors: 1 for the fastest frequency rising to `top` for the slowest."""
    ramp = np.linspace(0.0, 1.0, n)
    return [round(float(v), 4) for v in 1.0 + (top - 1.0) * ramp ** 2]


CONFIGS.update({
    # head_dim 32 is not hidden / heads (16): Qwen3's q/k/o shapes differ from the residual's
    "tiny-qwen3": _cfg(**{**_QWEN3, "head_dim": 32}, n_kv_heads=2),
    "tiny-qwen3-mha": _cfg(**_QWEN3, n_kv_heads=4, tie_embeddings=True),
    "tiny-phi3": _cfg(**_PHI3, n_kv_heads=4),
    # longrope: context (256) past the pretraining length (64), so the long factors and
    # transformers' attention factor sqrt(1 + ln 4 / ln 64) apply
    "tiny-phi3-longrope": _cfg(**{**_PHI3, "context_length": 256}, n_kv_heads=2,
                               rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 64,
                                             "short_factor": _longrope_factors(8, 1.5),
                                             "long_factor": _longrope_factors(8, 6.0)}),
    # Phi-4-mini's shape of rope: 3/4 of each head rotated, longrope, a tied head
    "tiny-phi4-mini": _cfg(**{**_PHI3, "context_length": 256, "hidden_size": 128, "head_dim": 32, "ffn_size": 256},
                           n_kv_heads=2, n_rot=24, tie_embeddings=True,
                           rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 64,
                                         "short_factor": _longrope_factors(12, 1.5),
                                         "long_factor": _longrope_factors(12, 6.0)}),
    "tiny-granite": _cfg(**_GRANITE, n_kv_heads=2, tie_embeddings=True, embedding_scale=12.0,
                         residual_scale=0.22, attention_scale=0.015625, logit_scale=8.0),
    "tiny-granite-mha": _cfg(**_GRANITE, n_kv_heads=4, attention_scale=0.25, logit_scale=2.5),
    "tiny-olmo2": _cfg(**_OLMO2, n_kv_heads=4),
    "tiny-olmo2-gqa": _cfg(**_OLMO2, n_kv_heads=2, tie_embeddings=True),
    # layer 3 skips rope (every 4th layer: llama.cpp's fixed step, transformers' default)
    "tiny-smollm3": _cfg(**_SMOLLM3, n_kv_heads=2, tie_embeddings=True, nope_layers=(3,)),
    "tiny-smollm3-nope": _cfg(**_SMOLLM3, n_kv_heads=4, nope_layers=(0, 2)),     # HF only (not llama.cpp's step)
    # half of each head rotated, interleaved pairs (GLM-4's HF and GGUF layout alike)
    "tiny-glm4": _cfg(**_GLM4, n_kv_heads=2, n_rot=8),
    "tiny-glm4-mha": _cfg(**_GLM4, n_kv_heads=4, n_rot=8, tie_embeddings=True),
    # StableLM 2: LayerNorms, a quarter of each head rotated (1.6B's), q/k/v biases or none
    "tiny-stablelm": _cfg(**_STABLELM, n_kv_heads=4, n_rot=4, attn_bias=True),
    "tiny-stablelm-gqa": _cfg(**_STABLELM, n_kv_heads=2, n_rot=8),
    # Mixtral: every layer routed, the top-k renormalised; expert FFN = intermediate_size
    "tiny-mixtral": _cfg(**_MIXTRAL, n_kv_heads=2, n_experts=4, n_experts_used=2),
    "tiny-mixtral-mha": _cfg(**_MIXTRAL, n_kv_heads=4, n_experts=8, n_experts_used=3, tie_embeddings=True),
    # Qwen3-MoE: per-head q/k norms, head_dim apart from hidden / heads, a small expert FFN
    "tiny-qwen3-moe": _cfg(**{**_QWEN3_MOE, "head_dim": 32}, n_kv_heads=2, n_experts=8, n_experts_used=2,
                           expert_ffn_size=32),
    # dense layers 0 and 2 (decoder_sparse_step 2) and 3 (mlp_only_layers), top-k not renormalised: HF only
    # (llama.cpp's qwen3moe has neither)
    "tiny-qwen3-moe-dense": _cfg(**{**_QWEN3_MOE, "n_layers": 4}, n_kv_heads=4, tie_embeddings=True, n_experts=4,
                                 n_experts_used=2, expert_ffn_size=48, norm_topk_prob=False, dense_layers=(0, 2, 3)),
})

# copy models (synthetic_copy.py): a config's shapes, weights whose greedy continuation follows
# fixed token cycles (what a trained model quoting its prompt gives speculative decoding)
CONFIGS.update({"tinyllama-1.1b-copy": CONFIGS["tinyllama-1.1b"], "small-k-copy": CONFIGS["small-k"]})

GGUF_FORMATS = ("F32", "F16", "BF16", "Q8_0", "Q4_K_M", "Q4_K", "Q6_K")
HF_DTYPES = ("float32", "float16", "bfloat16")
FILE_TYPE = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K": 14, "Q4_K_M": 15, "Q6_K": 18, "BF16": 32}
WEIGHT_STD, NORM_STD, BIAS_STD = 0.02, 0.05, 0.1
RNG_CHUNK = 1 << 22        # elements per RNG stream


def get_config(name):
    """The ModelConfig of a synthetic config name (a ModelConfig passes through: tests vary shapes)."""
    if isinstance(name, ModelConfig):
        return name.validate()
    if name not in CONFIGS:
        raise ValueError(f"unknown synthetic config {name!r} (known: {', '.join(CONFIGS)})")
    return CONFIGS[name]


# -- weights ---------------------------------------------------------------
def tensor_shapes(cfg):
    """[(canonical name, numpy shape)] in file order (rope_freqs excluded)."""
    shapes = expected_shapes(cfg)
    head = [n for n in ("token_embd.weight",) if n in shapes]
    tail = [n for n in ("output_norm.weight", "output_norm.bias", "output.weight") if n in shapes]
    middle = [n for n in shapes if n not in head and n not in tail]
    return [(n, shapes[n]) for n in head + middle + tail]


def file_tensors(cfg):
    """[(name, shape, parts)] as files store them: a family's fused tensors (registry.Family.fused)
    replace their parts, parts = [(canonical name, shape)] in row order; None for the others."""
    shapes = tensor_shapes(cfg)
    fused_at_first_part = {parts[0][0]: (name, shape, parts) for name, shape, parts in fused_shapes(cfg, dict(shapes))}
    in_fused = {part for _, _, parts in fused_at_first_part.values() for part, _ in parts}
    out = []
    for name, shape in shapes:
        if name in fused_at_first_part:
            out.append(fused_at_first_part[name])
        elif name not in in_fused:
            out.append((name, shape, None))
    return out


def file_tensor(name, shape, parts, seed, layout=lambda name, x: x, make=None):
    """float32 values of one file tensor: its parts' weights (each laid out) stacked by rows;
    `make` gives one canonical tensor's values (tensor_maker; default make_tensor)."""
    make = make or make_tensor
    if parts is None:
        return layout(name, make(name, shape, seed))
    return np.concatenate([layout(part, make(part, part_shape, seed)) for part, part_shape in parts])


def tensor_maker(config_name, cfg, seed):
    """make_tensor, or a copy config's weights (synthetic_copy.py)."""
    from pyforge.synthetic_copy import CopyWeights, is_copy_config
    return CopyWeights(config_name, cfg, seed) if is_copy_config(config_name) else make_tensor


def make_tensor(name, shape, seed):
    """float32 weights for one canonical tensor (HF layout), deterministic in (seed, name).

    Filled in chunks, each from its own RNG stream, on all cores (numpy's
    normal generator releases the GIL); the values do not depend on the core count.
    """
    n = math.prod(shape)
    x = np.empty(n, dtype=np.float32)
    key = zlib.crc32(name.encode())
    scale, shift = (NORM_STD, 1.0) if name.endswith("norm.weight") else (
        BIAS_STD if name.endswith(".bias") else WEIGHT_STD, 0.0)

    def fill(start):
        part = x[start:start + RNG_CHUNK]
        np.random.default_rng([seed, key, start // RNG_CHUNK]).standard_normal(out=part, dtype=np.float32)
        part *= scale
        part += shift

    starts = range(0, n, RNG_CHUNK)
    if len(starts) == 1:
        fill(0)
    else:
        with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1)) as pool:
            list(pool.map(fill, starts))
    return x.reshape(shape)


def permute_qk(w, n_head):
    """HF rotate-half rows -> llama.cpp interleaved rows: per head, row j and j + d/2 become 2j, 2j + 1."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w, n_head):
    """The inverse of permute_qk."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_layout(cfg, name, x):
    """The canonical tensor as stored in a GGUF of this arch (Q/K permuted where HF rotates halves
    and llama.cpp pairs neighbours: llama and its kin)."""
    fam = family(cfg.arch)
    if fam.hf_rope_neox and not fam.gguf_rope_neox and name.endswith(("attn_q.weight", "attn_k.weight")):
        n_head = cfg.n_heads if "attn_q" in name else cfg.n_kv_heads
        return permute_qk(x, n_head)
    return x


def to_bf16_bits(x):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


# -- GGUF ----------------------------------------------------------------
def _use_more_bits(i, n):
    # llama.cpp's choice of the layers whose attn_v / ffn_down get Q6_K in Q4_K_M
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def gguf_tensor_type(cfg, fmt, name, shape):
    """The stored type of one tensor for a file format (llama.cpp's choices for Q4_K_M)."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):    # llama.cpp keeps the router F32
        return GGMLType.F32
    want = {"F32": GGMLType.F32, "F16": GGMLType.F16, "BF16": GGMLType.BF16, "Q8_0": GGMLType.Q8_0,
            "Q4_K": GGMLType.Q4_K, "Q6_K": GGMLType.Q6_K, "Q4_K_M": GGMLType.Q4_K}[fmt]
    if fmt == "Q4_K_M":
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        if name == "output.weight" or (cfg.tie_embeddings and name == "token_embd.weight"):
            want = GGMLType.Q6_K
        elif name.endswith(("attn_v.weight", "ffn_down.weight")) and _use_more_bits(layer, cfg.n_layers):
            want = GGMLType.Q6_K
    if shape[-1] % BLOCK_LAYOUT[want][0] == 0:
        return want
    # rows that do not fill whole blocks fall back, as llama.cpp does (to types we run)
    return GGMLType.Q8_0 if shape[-1] % BLOCK_LAYOUT[GGMLType.Q8_0][0] == 0 else GGMLType.F16


def quantize(x, ggml_type):
    """float32 rows -> stored values for ggml_type (2-D: F32/F16/BF16 values, else uint8 row bytes)."""
    if ggml_type == GGMLType.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if ggml_type == GGMLType.F16:
        return x.astype(np.float16)
    if ggml_type == GGMLType.BF16:
        return to_bf16_bits(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    native = _native_quantize()
    if native is not None:
        out = native(x, int(ggml_type))
        out = np.frombuffer(out, dtype=np.uint8) if not isinstance(out, np.ndarray) else out.view(np.uint8)
        rows = x.size // x.shape[-1]
        block, size = BLOCK_LAYOUT[ggml_type]
        if out.size != rows * (x.shape[-1] // block * size):
            raise RuntimeError(f"pyforge.native.quant.quantize returned {out.size} bytes for {ggml_type.name} {x.shape}")
        return out.reshape(rows, -1)
    if ggml_type == GGMLType.Q8_0:
        import gguf
        return gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    raise NotImplementedError(f"quantizing to {ggml_type.name} needs pyforge.native.quant (not built yet)")


def _native_quantize():
    try:
        from pyforge.native import quant
    except ImportError:
        return None
    return getattr(quant, "quantize", None)


def _check_quantizable(types):
    if _native_quantize() is None:
        missing = sorted({t.name for t in types} - {"F32", "F16", "BF16", "Q8_0"})
        if missing:
            raise NotImplementedError(f"quantizing to {', '.join(missing)} needs pyforge.native.quant (not built yet)")


_EXPERT_NAME = re.compile(r"blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.(\d+)\.weight")


def merge_experts(cfg, entries):
    """file_tensors' entries with each MoE layer's per-expert matrices merged into llama.cpp's
    blk.{i}.ffn_*_exps.weight [n_experts, rows, cols] (the experts' rows, expert after expert)."""
    stems = {stem: merged for merged, stem in MERGED_EXPERTS.items()}
    shapes, out = expert_matrix_shapes(cfg), []
    for name, shape, parts in entries:
        m = _EXPERT_NAME.fullmatch(name)
        if m is None:
            out.append((name, shape, parts))
        elif m.group(3) == "0":
            i, stem = m.group(1), m.group(2)
            experts = [(f"blk.{i}.{stem}.{e}.weight", shapes[stem]) for e in range(cfg.n_experts)]
            out.append((f"blk.{i}.{stems[stem]}", (cfg.n_experts, *shapes[stem]), experts))
    return out


def gguf_plan(cfg, fmt, merged_experts=True):
    """[(GGUF name, numpy shape, stored type, fused parts or None)] in file order, rope frequency
    tensors included; a MoE model's experts merged (llama.cpp's layout today) or one tensor each
    (its older layout)."""
    entries = merge_experts(cfg, file_tensors(cfg)) if merged_experts else file_tensors(cfg)
    plan = [(name, shape, gguf_tensor_type(cfg, fmt, name, shape), parts) for name, shape, parts in entries]
    for name, values in reversed(_rope_tensors(cfg).items()):
        plan.insert(1, (name, values.shape, GGMLType.F32, None))
    return plan


def write_gguf(config_name, path, dtype="F32", seed=0, merged_experts=True):
    """Write a synthetic model as GGUF; each tensor is generated, converted and written in turn,
    so memory stays at about one tensor. dtype: F32, F16, BF16, Q8_0, Q4_K_M, Q4_K, Q6_K.
    merged_experts=False writes a MoE model's experts one tensor each (llama.cpp's older layout)."""
    import gguf

    if dtype not in GGUF_FORMATS:
        raise ValueError(f"unknown GGUF format {dtype!r} (known: {', '.join(GGUF_FORMATS)})")
    cfg, path = get_config(config_name), Path(path)
    _check_gguf_can_hold(config_name, cfg)
    plan = gguf_plan(cfg, dtype, merged_experts)
    _check_quantizable(t for _, _, t, _ in plan)
    make = tensor_maker(config_name, cfg, seed)
    rope_tensors = _rope_tensors(cfg)
    w = gguf.GGUFWriter(str(path), family(cfg.arch).gguf_architecture)
    try:
        _add_gguf_metadata(w, cfg, config_name, dtype, seed)
        for name, shape, t, _ in plan:
            block, size = BLOCK_LAYOUT[t]
            stored_shape = shape if block == 1 else (*shape[:-1], shape[-1] // block * size)
            stored_dtype = {GGMLType.F32: np.float32, GGMLType.F16: np.float16, GGMLType.BF16: np.uint16}.get(t, np.uint8)
            w.add_tensor_info(name, stored_shape, np.dtype(stored_dtype), math.prod(shape) // block * size,
                              raw_dtype=gguf.GGMLQuantizationType(int(t)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, shape, t, parts in plan:
            if name in rope_tensors:
                w.write_tensor_data(rope_tensors[name])
                continue
            x = file_tensor(name, shape, parts, seed, lambda part, v: gguf_layout(cfg, part, v), make)
            if x.ndim > 1:     # rows of every dimension but the last (merged experts: [n_experts, rows, cols])
                x = quantize(x.reshape(-1, shape[-1]), t)
                x = x.reshape(shape) if t in (GGMLType.F32, GGMLType.F16, GGMLType.BF16) else x
            w.write_tensor_data(x)
            del x
        w.close()
    except BaseException:
        w.close()
        path.unlink(missing_ok=True)
        raise
    return path


def _rope_tensors(cfg):
    """{GGUF name: float32 values} of the rope frequency tensors a scaled rope needs (llama.cpp's)."""
    kind = (cfg.rope_scaling or {}).get("rope_type")
    if kind == "llama3":
        from pyforge.models.rope_scaling import llama3_freq_factors
        return {"rope_freqs.weight": np.asarray(llama3_freq_factors(cfg.n_rot, cfg.rope_theta, cfg.rope_scaling),
                                                dtype=np.float32)}
    if kind == "longrope":
        return {f"rope_factors_{w}.weight": np.asarray(cfg.rope_scaling[f"{w}_factor"], dtype=np.float32)
                for w in ("long", "short")}
    return {}


def _check_gguf_can_hold(config_name, cfg):
    """ValueError unless the family options a GGUF reader derives from our metadata are the config's
    (llama.cpp fixes SmolLM3's NoPE layers, for one)."""
    fam = family(cfg.arch)
    keys = {**_gguf_numbers(cfg), **fam.gguf_extras(cfg), **_gguf_expert_keys(cfg)}
    derived = fam.gguf_options(lambda key, kind, default=None: kind(keys.get(key, default)), cfg.n_layers)
    differ = {k: v for k, v in derived.items() if getattr(cfg, k) != v}
    if differ:
        raise ValueError(f"{config_name}: a {cfg.arch} GGUF cannot hold this config (a reader would take {differ})")


def _gguf_numbers(cfg):
    """{key suffix: value} of the numbers _add_gguf_metadata writes for every family."""
    return {"context_length": cfg.context_length, "embedding_length": cfg.hidden_size, "block_count": cfg.n_layers,
            "feed_forward_length": cfg.ffn_size, "attention.head_count": cfg.n_heads,
            "attention.head_count_kv": cfg.n_kv_heads, "attention.key_length": cfg.head_dim,
            "attention.value_length": cfg.head_dim, "rope.dimension_count": cfg.n_rot,
            "rope.freq_base": cfg.rope_theta, family(cfg.arch).gguf_eps_key: cfg.rms_eps}


def _gguf_expert_keys(cfg):
    """{GGUF key suffix: integer} of a MoE model (llama.cpp's names)."""
    if not cfg.n_experts:
        return {}
    return {"expert_count": cfg.n_experts, "expert_used_count": cfg.n_experts_used,
            "expert_feed_forward_length": cfg.expert_ffn_size, "feed_forward_length": cfg.ffn_size}


def _add_gguf_metadata(w, cfg, config_name, fmt, seed):
    import gguf

    arch = family(cfg.arch).gguf_architecture
    w.add_name("pyforge synthetic model")     # llama.cpp tunes vocabularies by name ("phi3"): keep it neutral
    w.add_string("pyforge.synthetic.config", config_name if isinstance(config_name, str) else "custom")
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_size)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.n_rot)
    w.add_rope_freq_base(cfg.rope_theta)
    if family(cfg.arch).norm == "layer":
        w.add_layer_norm_eps(cfg.rms_eps)
    else:
        w.add_layer_norm_rms_eps(cfg.rms_eps)
    for key, value in family(cfg.arch).gguf_extras(cfg).items():
        _add_typed(w, f"{arch}.{key}", value)
    for key, value in _gguf_expert_keys(cfg).items():
        if key != "feed_forward_length":
            w.add_uint32(f"{arch}.{key}", value)
    if (cfg.rope_scaling or {}).get("rope_type") == "longrope":
        w.add_float32(f"{arch}.rope.scaling.attn_factor", longrope_attention_factor(cfg))
        w.add_uint32(f"{arch}.rope.scaling.original_context_length",
                     cfg.rope_scaling["original_max_position_embeddings"])
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(FILE_TYPE[fmt])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_uint32("pyforge.synthetic.seed", seed)
    for key, (value, vtype, etype) in _vocab_metadata().items():
        w.add_key_value(key, value, gguf.GGUFValueType(vtype),
                        sub_type=None if etype is None else gguf.GGUFValueType(etype))
    template = _chat_template()
    if template:
        w.add_chat_template(template)


def _add_typed(w, key, value):
    """A metadata key with the GGUF type llama.cpp reads it as: string, uint32 or float32."""
    if isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, int) and not isinstance(value, bool):
        w.add_uint32(key, value)
    else:
        w.add_float32(key, float(value))


def _vocab_metadata():
    """tokenizer.* keys of the Llama 2 vocabulary GGUF: key -> (value, type, element type)."""
    from pyforge.loader.gguf import read_gguf

    gf = read_gguf(shared_dir() / "vocab" / "ggml-vocab-llama-spm.gguf")
    try:
        return {k: (v, *gf.value_types[k]) for k, v in gf.metadata.items()
                if k.startswith("tokenizer.") and k != "tokenizer.chat_template"}
    finally:
        gf.close()


def _chat_template():
    with open(_tinyllama_dir() / "tokenizer_config.json", encoding="utf-8") as f:
        return json.load(f).get("chat_template")


# -- Hugging Face folder --------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
MAX_SHARD_BYTES = 2 << 30


def hf_config_dict(cfg, dtype="float32"):
    fam = family(cfg.arch)
    out = {
        "architectures": [fam.hf_architectures[0]], "model_type": fam.hf_model_type,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.context_length,
        fam.hf_eps_key: cfg.rms_eps, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings, "vocab_size": cfg.vocab_size,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,    # not some family's default, past our vocab
        "initializer_range": WEIGHT_STD, "torch_dtype": dtype,
    }
    if cfg.n_rot != cfg.head_dim:
        out["partial_rotary_factor"] = cfg.n_rot / cfg.head_dim
    if (cfg.rope_scaling or {}).get("rope_type") == "longrope":
        # Phi-3 keeps it at the top level too, and transformers prefers that copy
        out["original_max_position_embeddings"] = cfg.rope_scaling["original_max_position_embeddings"]
    out.update(fam.hf_config_extras(cfg))
    return out


def write_hf_folder(config_name, path, dtype="float32", seed=0, shards=None):
    """Write a synthetic model as a HF folder; shards > 1 writes model-0000i-of-0000n + index."""
    from safetensors import TensorSpec, serialize_file

    if dtype not in HF_DTYPES:
        raise ValueError(f"unknown HF dtype {dtype!r} (known: {', '.join(HF_DTYPES)})")
    cfg, path = get_config(config_name), Path(path)
    fam = family(cfg.arch)
    path.mkdir(parents=True, exist_ok=True)
    itemsize = 4 if dtype == "float32" else 2
    specs = [(name, shape) for name, shape, _ in file_tensors(cfg)]
    parts_of = {name: parts for name, _, parts in file_tensors(cfg)}
    make = tensor_maker(config_name, cfg, seed)
    sizes = [math.prod(s) * itemsize for _, s in specs]
    n = shards or max(1, -(-sum(sizes) // MAX_SHARD_BYTES))
    groups = _split(specs, sizes, n)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        arrays = {canonical_to_hf(name, fam):
                  _hf_array(_hf_values(fam, name, file_tensor(name, shape, parts_of[name], seed, make=make)), dtype)
                  for name, shape in group}
        spec = {k: TensorSpec(dtype="bfloat16" if dtype == "bfloat16" else a.dtype.name, shape=a.shape,
                              data_ptr=a.ctypes.data, data_len=a.nbytes) for k, a in arrays.items()}
        serialize_file(spec, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in arrays})
        del arrays, spec
    if n > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype), indent=2) + "\n")
    for fname in TOKENIZER_FILES:
        src = _tinyllama_dir() / fname
        if src.exists():
            shutil.copyfile(src, path / fname)
    return path


def _hf_values(fam, name, x):
    """A canonical tensor as the family's HF files store it (norms less the family's offset)."""
    if fam.hf_norm_offset and name.endswith("norm.weight"):
        x -= np.float32(fam.hf_norm_offset)
    return x


def _hf_array(x, dtype):
    if dtype == "float16":
        return x.astype(np.float16)
    if dtype == "bfloat16":
        return to_bf16_bits(x)
    return x


def _split(specs, sizes, n):
    """n contiguous groups of roughly equal bytes (none empty)."""
    n = max(1, min(n, len(specs)))
    target, groups, acc = sum(sizes) / n, [[]], 0
    for (spec, size) in zip(specs, sizes):
        if groups[-1] and acc >= target * len(groups) and len(groups) < n:
            groups.append([])
        groups[-1].append(spec)
        acc += size
    while len(groups) < n:                 # few large tensors: split the last groups further
        big = max((g for g in groups if len(g) > 1), key=len)
        groups.insert(groups.index(big) + 1, [big.pop()])
    return groups


# -- shared data and the cache ---------------------------------------------
def shared_dir():
    """The project's shared data folder (vocabularies, tokenizer files)."""
    env = os.environ.get("PYFORGE_SHARED_DIR")
    repo = Path(__file__).resolve().parents[1]
    for cand in ([Path(env)] if env else []) + [repo / "shared", repo.parent / "shared"]:
        if (cand / "vocab" / "ggml-vocab-llama-spm.gguf").exists():
            return cand
    raise FileNotFoundError("shared data folder not found (vocab/ggml-vocab-llama-spm.gguf); set PYFORGE_SHARED_DIR")


def _tinyllama_dir():
    return shared_dir() / "models" / "TinyLlama-1.1B-Chat-v1.0"


def default_cache_dir():
    return Path(os.environ.get("PYFORGE_MODEL_CACHE") or Path.home() / ".cache" / "pyforge" / "models")


def ensure_model(config_name, fmt="Q4_K_M", cache_dir=None, seed=0):
    """Path of a cached synthetic model, generated on first use.

    fmt: a GGUF format (F32, F16, BF16, Q8_0, Q4_K_M, Q4_K, Q6_K) or a HF dtype
    ("hf-float32", "hf-float16", "hf-bfloat16"; the bare dtype works too).
    """
    if not isinstance(config_name, str):
        raise TypeError("ensure_model caches named configs only (write_gguf / write_hf_folder take a ModelConfig)")
    get_config(config_name)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    hf_dtype = fmt[3:] if fmt.startswith("hf-") else fmt if fmt in HF_DTYPES else None
    stem = f"{config_name}-{fmt}-s{seed}-v{VERSION}"
    if hf_dtype is None:
        final = cache / f"{stem}.gguf"
        if not final.exists():
            fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{stem}.", suffix=".tmp")
            os.close(fd)
            try:
                write_gguf(config_name, tmp, fmt, seed)
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return final
    final = cache / f"{stem}-hf"
    if not final.exists():
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{stem}.", suffix=".tmp"))
        try:
            write_hf_folder(config_name, tmp, hf_dtype, seed)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():      # another process won the race: use theirs
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return final


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pyforge.synthetic", description="generate a random-weight model")
    p.add_argument("config", choices=sorted(CONFIGS))
    p.add_argument("--format", default="Q4_K_M",
                   help=f"GGUF: {', '.join(GGUF_FORMATS)}; HF folder: {', '.join('hf-' + d for d in HF_DTYPES)}")
    p.add_argument("--out", help="output file (GGUF) or folder (HF); default: the model cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=None, help="HF only: number of safetensors shards")
    args = p.parse_args(argv)
    start = time.perf_counter()
    fmt = args.format
    hf_dtype = fmt[3:] if fmt.startswith("hf-") else None
    if args.out is None:
        out = ensure_model(args.config, fmt, seed=args.seed)
    elif hf_dtype:
        out = write_hf_folder(args.config, args.out, hf_dtype, args.seed, args.shards)
    else:
        out = write_gguf(args.config, args.out, fmt, args.seed)
    print(f"{out}  ({args.config}, {fmt}, seed {args.seed}, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
