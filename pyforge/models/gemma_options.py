"""The config keys only Gemma 1, 2 and 3 have: read from a config.json or GGUF
metadata into ModelConfig fields, and written back by the synthetic generator.

    embedding_scale     sqrt(hidden_size) (every version)
    attention_scale     query_pre_attn_scalar ** -0.5 (2, 3)
    sliding_window,     the window and its layers: `layer_types` when given, else
    sliding_layers      every layer but each `pattern`-th (2: every 2nd, 3: 5 of 6)
    attn_softcap,       attn_logit_softcapping, final_logit_softcapping (2)
    final_softcap
    rope_theta_local    rope_local_base_freq: the sliding layers' rope base (3)

Absent keys take transformers' defaults for the version (Gemma2Config,
Gemma3TextConfig). GGUF files carry what llama.cpp writes; what it hard-codes
(the window pattern, Gemma 3's local rope base) is hard-coded here the same way.
"""
import math
from functools import partial

# transformers' defaults for keys a config.json leaves out, per version
HF_DEFAULTS = {
    1: {},
    2: {"query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0},
    3: {"query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": None,
        "final_logit_softcapping": None, "rope_local_base_freq": 10000.0},
}
WINDOW_PATTERN = {2: 2, 3: 6}       # every pattern-th layer is global (transformers' and llama.cpp's rule)
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")   # transformers' names of GELU's tanh approximation
LLAMA_CPP_27B_LAYERS = {2: 46, 3: 62}   # llama.cpp scales q by (hidden / heads) ** -0.5 for these


def family_options(version):
    """The registry.Family fields of Gemma `version` (1, 2 or 3) that read and write its keys."""
    return dict(hf_options=partial(from_hf, version), gguf_options=partial(from_gguf, version),
                gguf_extras=partial(gguf_keys, version), hf_config_extras=partial(config_json, version))


def windowed_layers(n_layers, version):
    """Transformers' default layer_types: layer i slides unless (i + 1) is a multiple of the pattern."""
    pattern = WINDOW_PATTERN.get(version)
    return tuple(i for i in range(n_layers) if pattern and (i + 1) % pattern)


def _number(cfg, key, default, kind=float):
    value = cfg[key] if key in cfg else default
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ValueError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def from_hf(version, cfg):
    """Extra ModelConfig fields of a Gemma config.json dict (ValueError naming a bad key)."""
    defaults = HF_DEFAULTS[version]
    act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in GELU_TANH:
        raise ValueError(f"hidden_activation {act!r} is not supported (Gemma: gelu_pytorch_tanh)")
    hidden = _number(cfg, "hidden_size", None, int)
    out = {"embedding_scale": math.sqrt(hidden) if hidden and hidden > 0 else 1.0}
    if version == 1:
        return out
    scalar = _number(cfg, "query_pre_attn_scalar", defaults["query_pre_attn_scalar"])
    window = _number(cfg, "sliding_window", defaults["sliding_window"], int) or 0
    out.update(attention_scale=scalar ** -0.5 if scalar and scalar > 0 else None,
               attn_softcap=_number(cfg, "attn_logit_softcapping", defaults["attn_logit_softcapping"]) or 0.0,
               final_softcap=_number(cfg, "final_logit_softcapping", defaults["final_logit_softcapping"]) or 0.0,
               sliding_window=window,
               sliding_layers=_hf_sliding_layers(cfg, version) if window else ())
    if version == 3:
        out.update(_gemma3_rope(cfg, defaults))
    return out


def _hf_sliding_layers(cfg, version):
    n_layers = _number(cfg, "num_hidden_layers", None, int) or 0
    types = cfg.get("layer_types")
    if types is None:
        pattern = cfg.get("sliding_window_pattern", WINDOW_PATTERN[version])
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
            raise ValueError(f"sliding_window_pattern must be a positive integer, got {pattern!r}")
        return tuple(i for i in range(n_layers) if (i + 1) % pattern)
    if not isinstance(types, list) or len(types) != n_layers or \
            not all(t in ("sliding_attention", "full_attention") for t in types):
        raise ValueError(f"layer_types must list {n_layers} of 'sliding_attention' / "
                         f"'full_attention', got {str(types)[:80]}")
    return tuple(i for i, t in enumerate(types) if t == "sliding_attention")


def _gemma3_rope(cfg, defaults):
    """Gemma 3's two ropes: the global layers' (rope_theta, rope_scaling) and the local base;
    transformers 5's `rope_parameters` holds one dict per layer type instead."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        full, local = params["full_attention"], params.get("sliding_attention")
        local = local if isinstance(local, dict) else {}
        out = {"rope_theta_local": _number(local, "rope_theta", defaults["rope_local_base_freq"])}
        if "rope_theta" in full:
            out["rope_theta"] = _number(full, "rope_theta", None)
        kind = full.get("rope_type", "default")
        out["rope_scaling"] = None if kind == "default" else \
            {"rope_type": kind, **{k: v for k, v in full.items() if k not in ("rope_type", "rope_theta")}}
        return out
    return {"rope_theta_local": _number(cfg, "rope_local_base_freq", defaults["rope_local_base_freq"])}


def from_gguf(version, number, n_layers):
    """Extra ModelConfig fields from GGUF metadata; number(key, kind, default) reads `{arch}.{key}`."""
    hidden, heads = number("embedding_length", int), number("attention.head_count", int)
    out = {"embedding_scale": math.sqrt(hidden)}
    if version == 1:
        return out
    head_dim = number("attention.key_length", int, hidden // max(heads, 1))
    # llama.cpp's rule (it stores no query_pre_attn_scalar): head_dim, but hidden / heads for the 27B models
    scalar = hidden / heads if n_layers == LLAMA_CPP_27B_LAYERS[version] and heads > 0 else head_dim
    window = number("attention.sliding_window", int, HF_DEFAULTS[version]["sliding_window"])
    out.update(attention_scale=scalar ** -0.5, sliding_window=window,
               sliding_layers=windowed_layers(n_layers, version) if window else (),
               attn_softcap=number("attn_logit_softcapping", float, 50.0 if version == 2 else 0.0),
               final_softcap=number("final_logit_softcapping", float, 30.0 if version == 2 else 0.0))
    if version == 3:
        out["rope_theta_local"] = number("rope.freq_base_swa", float, HF_DEFAULTS[3]["rope_local_base_freq"])
    return out


def config_json(version, c):
    """What a written Gemma config.json adds to the common keys."""
    out = {"attention_bias": False, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}
    if version == 1:
        return out
    scalar = c.head_dim if c.attention_scale is None else round(c.attention_scale ** -2, 6)
    scalar = int(scalar) if float(scalar).is_integer() else scalar    # transformers wants an int when it is one
    out.update(query_pre_attn_scalar=scalar, sliding_window=c.sliding_window or None,
               layer_types=["sliding_attention" if i in c.sliding_layers else "full_attention"
                            for i in range(c.n_layers)],
               attn_logit_softcapping=c.attn_softcap or None, final_logit_softcapping=c.final_softcap or None)
    if version == 3:
        out["rope_local_base_freq"] = c.rope_theta_local
    return out


def gguf_keys(version, c):
    """{GGUF key suffix: value} of a written Gemma file, as llama.cpp's converter writes them."""
    out = {}
    if version >= 2:
        out["attention.sliding_window"] = c.sliding_window
    if version == 2:
        out.update({"attn_logit_softcapping": c.attn_softcap, "final_logit_softcapping": c.final_softcap})
    if version == 3 and c.rope_scaling:
        out.update({"rope.scaling.type": c.rope_scaling["rope_type"], "rope.scaling.factor": c.rope_scaling["factor"]})
    return out
