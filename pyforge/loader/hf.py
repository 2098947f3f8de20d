"""Hugging Face model folders: config.json + *.safetensors [+ model.safetensors.index.json].

HF q/k weights are stored for rotate-half rope (not permuted as GGUF llama
files are), so every HF model gets rope_neox=True.
"""
import json
import os

import numpy as np

from pyforge.dequant import to_float32
from pyforge.ggml_types import GGMLType
from pyforge.loader import ModelFile, ModelFileError, TensorRef, check_tensors, validated
from pyforge.loader.names import IGNORE, canonical_to_hf, hf_to_canonical, split_fused
from pyforge.loader.safetensors import read_safetensors
from pyforge.models.config import LONGROPE_LISTS, ModelConfig
from pyforge.models.registry import FAMILIES, family, family_of_hf_config

MAX_JSON = 64 * 1000 * 1000
INDEX = "model.safetensors.index.json"



def read_json(path, what):
    try:
        size = os.path.getsize(path)
        if size > MAX_JSON:
            raise ModelFileError(path, f"{what} is {size} bytes, larger than the {MAX_JSON}-byte limit")
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise ModelFileError(path, f"cannot read {what}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelFileError(path, f"{what} is not valid JSON: {str(e)[:200]}") from None


def config_from_hf(cfg, path="config.json"):
    """A (validated) ModelConfig from a parsed HF config.json dict (transformers 4's keys or 5's:
    rope_theta + rope_scaling or rope_parameters, torch_dtype or dtype)."""
    def fail(problem):
        raise ModelFileError(path, problem)

    if not isinstance(cfg, dict):
        fail("config.json must hold a JSON object")
    fam = family_of_hf_config(cfg)
    if fam is None:
        supported = ", ".join(a for f in FAMILIES.values() for a in (*f.hf_architectures, *f.hf_wrappers))
        fail(f"unsupported model: architectures {cfg.get('architectures')!r}, model_type "
             f"{cfg.get('model_type')!r} (supported: {supported})")
    wrapper = _wrapper(fam, cfg)
    if wrapper is not None:
        cfg = _text_config(cfg, wrapper[0], fam, fail)
    defaults = fam.hf_defaults

    def get(key, kind, default=None, value=None):
        v = cfg.get(key) if value is None else value
        if v is None:
            v = defaults.get(key, default)
        if v is None:
            fail(f"config.json is missing {key}")
        ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok:
            fail(f"config.json {key} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
        return kind(v)

    if fam.ffn_act == "silu" and cfg.get("hidden_act", "silu") != "silu":
        fail(f"hidden_act {cfg.get('hidden_act')!r} is not supported (silu only)")
    if cfg.get("mlp_bias"):
        fail("mlp_bias is not supported")
    if not fam.qkv_bias and cfg.get("attention_bias"):
        fail(f"attention_bias (with an o_proj bias) is not supported for {fam.arch}")
    for key in ("torch_dtype", "dtype"):       # the weights' own dtype is what we read
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            fail(f"config.json {key} must be a string, got {cfg[key]!r}")
    hidden = get("hidden_size", int)
    n_heads = get("num_attention_heads", int)
    if n_heads <= 0:
        fail(f"num_attention_heads must be positive, got {n_heads}")
    n_layers = get("num_hidden_layers", int)
    head_dim = get("head_dim", int, hidden // n_heads)
    theta, scaling, rotary = _rope(cfg, fail, defaults)
    rotary = get("partial_rotary_factor", float, 1.0, rotary)
    try:
        options = fam.hf_options(cfg)
    except ValueError as e:
        fail(f"config.json: {e}")
    if fam.window_all_layers:
        options.update(_window_all_layers(cfg, defaults, n_layers, fail))
    context = get("max_position_embeddings", int)
    if "sliding_window" not in options and _slides(cfg, n_layers, fail):
        window = cfg.get("sliding_window")
        if isinstance(window, int) and not isinstance(window, bool) and 0 < window < context:
            context = window      # no window of its own for this family: exact only up to the window
    if scaling is not None and scaling["rope_type"] == "longrope":
        _complete_longrope(cfg, scaling, get, fail, context)
    fields = dict(
        arch=fam.arch,
        hidden_size=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads", int, n_heads),
        head_dim=head_dim,
        ffn_size=get("intermediate_size", int),
        vocab_size=get("vocab_size", int),
        rms_eps=get(fam.hf_eps_key, float),
        rope_theta=theta,
        n_rot=int(head_dim * rotary) // 2 * 2,
        rope_neox=fam.hf_rope_neox,
        rope_scaling=scaling,
        context_length=context,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", defaults.get("tie_word_embeddings", False))),
        attn_bias=fam.qkv_bias and cfg.get("attention_bias") is not False,
    )
    return validated(path, ModelConfig(**{**fields, **options}))


def _wrapper(fam, cfg):
    """The family's hf_wrappers entry when config.json describes a model holding the family's text
    model (Gemma 3's image-text one), else None."""
    archs = cfg.get("architectures")
    return fam.hf_wrappers.get(archs[0]) if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


def _text_config(cfg, key, fam, fail):
    """The text model's config of a wrapping model's config.json (its tie_word_embeddings on top)."""
    text = cfg.get(key)
    if not isinstance(text, dict):
        fail(f"config.json of {cfg['architectures'][0]} has no {key} object")
    out = {**text, "architectures": [fam.hf_architectures[0]]}
    if "tie_word_embeddings" in cfg:
        out["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    return out


def _text_tensor(name, wrapper):
    """A wrapping model's tensor name as its text model alone would have it, or None for the
    wrapper's other tensors (a vision tower): they are not loaded."""
    if wrapper is None:
        return name
    _, prefixes, skipped = wrapper
    if name.startswith(skipped):
        return None
    prefix = next((p for p in sorted(prefixes, key=len, reverse=True) if name.startswith(p)), None)
    return name if prefix is None else prefixes[prefix] + name[len(prefix):]


def _window_all_layers(cfg, defaults, n_layers, fail):
    """sliding_window on every layer (Mistral); an explicit null, or none, means no window."""
    window = cfg["sliding_window"] if "sliding_window" in cfg else defaults.get("sliding_window")
    if window is None:
        return {}
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        fail(f"config.json sliding_window must be a non-negative integer or null, got {window!r}")
    return {"sliding_window": window, "sliding_layers": tuple(range(n_layers)) if window else ()}


def _complete_longrope(cfg, scaling, get, fail, context):
    """Longrope needs both factor lists, and its pretraining length: Phi-3 keeps that at the top
    level of config.json, and transformers prefers it there."""
    missing = [key for key in LONGROPE_LISTS if key not in scaling]
    if missing:
        fail(f"config.json longrope rope_scaling needs {missing[0]}")
    original = cfg.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
    scaling["original_max_position_embeddings"] = get("original_max_position_embeddings", int, context, original)


ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def _slides(cfg, n_layers, fail):
    """Whether config.json asks for a sliding window its family does not model per layer (Qwen2/3):
    use_sliding_window, or transformers 5's layer_types naming a sliding layer."""
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers or any(t not in ATTENTION_LAYER_TYPES for t in types):
            fail(f"config.json layer_types must list one of {', '.join(ATTENTION_LAYER_TYPES)} per layer "
                 f"({n_layers}), got {str(types)[:80]}")
        return "sliding_attention" in types
    return cfg.get("use_sliding_window") is True


# rope parameters that are not scaling options
_ROPE_NOT_SCALING = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
_ROPE_TYPE_ALIASES = {"su": "longrope"}     # Phi-3's first configs


def _rope(cfg, fail, defaults):
    """(theta, rope_scaling, partial_rotary_factor or None) from `rope_theta` + `rope_scaling`
    (transformers 4) or `rope_parameters` (transformers 5)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = params["rope_theta"], params
    else:
        theta, scaling = cfg.get("rope_theta"), cfg.get("rope_scaling")
    if theta is None:
        theta = defaults["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        fail(f"config.json rope_theta must be a number, got {theta!r}")
    if scaling is None:
        return float(theta), None, None
    if not isinstance(scaling, dict):
        fail(f"config.json rope_scaling must be an object, got {scaling!r}")
    rotary = scaling.get("partial_rotary_factor")
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return float(theta), None, rotary
    out = {"rope_type": _ROPE_TYPE_ALIASES.get(str(kind), str(kind))}
    for key, value in scaling.items():
        if key not in _ROPE_NOT_SCALING and value is not None:
            out[key] = value
    return float(theta), out, rotary


def load_hf_folder(folder):
    folder = os.fspath(folder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ModelFileError(folder, "not a model folder: no config.json (expected a GGUF file or a HF folder)")
    raw = read_json(config_path, "config.json")
    config = config_from_hf(raw, config_path)
    fam = family(config.arch)
    wrapper = _wrapper(fam, raw)
    files, index = _shard_files(folder)
    opened, tensors = [], {}
    try:
        for fname in files:
            sf = read_safetensors(os.path.join(folder, fname))
            opened.append(sf)
            for name in sf.entries:
                if index is not None and index.get(name, fname) != fname:
                    raise ModelFileError(sf.path, f"tensor {name} is listed in {INDEX} under {index[name]}")
                text_name = _text_tensor(name, wrapper)
                if text_name is None:
                    continue
                canon = hf_to_canonical(text_name, fam)
                if canon is None:
                    raise ModelFileError(sf.path, f"unexpected tensor {name} (not part of a {config.arch} model)")
                if canon == IGNORE:
                    continue
                if canon in tensors:
                    raise ModelFileError(sf.path, f"duplicate tensor {name}")
                tensors[canon] = sf.tensor_ref(name, canon)
        if index is not None:
            held = {name for sf in opened for name in sf.entries}
            missing = sorted(set(index) - held)
            if missing:
                raise ModelFileError(os.path.join(folder, INDEX), f"lists tensor {missing[0]} that no shard holds")
        if config.tie_embeddings:
            tensors.pop("output.weight", None)     # some tied checkpoints save the head too
        split_fused(folder, config, tensors)
        check_tensors(folder, config, tensors, file_name=lambda canonical: _hf_name(canonical, fam))
        if fam.hf_norm_offset:
            _offset_norms(tensors, fam.hf_norm_offset)
    except BaseException:
        tensors = None
        for sf in opened:
            sf.close()
        raise
    return ModelFile(folder, config, tensors, {}, ("hf", folder), closers=[sf.close for sf in opened])


def _shard_files(folder):
    """(safetensors file names, weight_map or None)."""
    index_path = os.path.join(folder, INDEX)
    if os.path.isfile(index_path):
        index = read_json(index_path, INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFileError(index_path, "has no weight_map object")
        files = []
        for name, fname in weight_map.items():
            if (not isinstance(fname, str) or os.path.basename(fname) != fname
                    or not fname.endswith(".safetensors") or fname.startswith(".")):
                raise ModelFileError(index_path, f"tensor {name} maps to a bad file name {fname!r}")
            if fname not in files:
                if not os.path.isfile(os.path.join(folder, fname)):
                    raise ModelFileError(index_path, f"shard {fname} is missing from the folder")
                files.append(fname)
        return files, weight_map
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return ["model.safetensors"], None
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise ModelFileError(folder, "no *.safetensors weights in the folder (PyTorch .bin files are not supported)")
    return files, None


def _offset_norms(tensors, offset):
    """A family whose RMSNorm multiplies by (offset + w) stores w in HF files: hand the model
    offset + w (float32), as llama.cpp's GGUF files store it."""
    for name, ref in tensors.items():
        if name.endswith("norm.weight"):
            tensors[name] = TensorRef(name, GGMLType.F32, ref.shape, to_float32(ref) + np.float32(offset))


def _hf_name(canonical, fam):
    try:
        return canonical_to_hf(canonical, fam)
    except KeyError:
        return None
