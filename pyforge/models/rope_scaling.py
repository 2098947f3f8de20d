"""Per-frequency rope divisors (llama.cpp's rope_freqs) for scaled rope variants, and
longrope's attention factor (a multiplier of the rotated dims of q and k)."""
import math

import numpy as np


def llama3_freq_factors(n_rot, theta, scaling):
    """Llama 3.1 rope scaling: long wavelengths are slowed by `factor`, short
    ones kept, the band between interpolated smoothly."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = np.ones(n_rot // 2, dtype=np.float32)
    for i in range(n_rot // 2):
        freq = theta ** (-2.0 * i / n_rot)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            continue
        if wavelen > low_wavelen:
            factors[i] = factor
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors[i] = 1.0 / ((1 - smooth) / factor + smooth)
    return factors


def uses_long_factors(config):
    """longrope (Phi-3): the long factors when the context reaches past the pretraining
    length, as llama.cpp chooses (by context size, once: keys in the cache stay valid)."""
    original = config.rope_scaling.get("original_max_position_embeddings", config.context_length)
    return config.context_length > original


def longrope_attention_factor(config):
    """The multiplier of cos and sin (so of q.k twice) that transformers computes for longrope."""
    scaling = config.rope_scaling
    if not scaling or scaling.get("rope_type") != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = float(scaling["original_max_position_embeddings"])
    factor = float(scaling.get("factor") or config.context_length / original)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def freq_factors_for(config, tensors):
    """The rope divisors a model asks for, or None for plain rope."""
    if "rope_freqs.weight" in tensors:
        return np.ascontiguousarray(tensors["rope_freqs.weight"].data, dtype=np.float32)
    scaling = config.rope_scaling
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "llama3":
        return llama3_freq_factors(config.n_rot, config.rope_theta, scaling)
    if kind == "longrope":
        which = "long" if uses_long_factors(config) else "short"
        if f"rope_factors_{which}.weight" in tensors:       # GGUF
            return np.ascontiguousarray(tensors[f"rope_factors_{which}.weight"].data, dtype=np.float32)
        return np.asarray(scaling[f"{which}_factor"], dtype=np.float32)
    if kind == "linear":        # positions divided by factor: every frequency slowed alike
        return np.full(config.n_rot // 2, float(scaling["factor"]), dtype=np.float32)
    if kind in (None, "default"):
        return None
    raise ValueError(f"unsupported rope scaling type {kind!r}")
