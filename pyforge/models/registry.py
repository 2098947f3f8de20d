"""Model families as data: one entry per family holds its names (our `arch`, which
is also GGUF's general.architecture; Hugging Face `architectures` and
`model_type`), the config defaults transformers assumes, the rope style, norm
layout, tensor names and fused-tensor splits of its files, the config keys only
it has, and its model class. Adding a Llama-shaped family is one entry here; a
new block shape is one model file plus its entry. Nothing outside this file and
a family's model file asks which family a model is.

The tensor names are llama.cpp's GGUF names for every family here
(pyforge/loader/names.py maps the Hugging Face ones to them).
"""
import importlib
from dataclasses import dataclass, field
from typing import Callable

from pyforge.models import gemma_options

# transformers' defaults, where a config.json leaves a field out
_ROPE_EPS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0}
_GEMMA_DEFAULTS = {"head_dim": 256, "tie_word_embeddings": True}

# Which norms a decoder layer has (llama.cpp names): before each block (pre), on each
# block's output before the residual add (post: OLMo 2), or both (sandwich: GLM-4, Gemma 2/3).
PRE_NORM = ("attn_norm", "ffn_norm")
POST_NORM = ("post_attention_norm", "post_ffw_norm")
SANDWICH_NORM = PRE_NORM + POST_NORM

# Fused tensors split into ours at load (rows in this order; GGUF phi3/glm4 store the
# fused MLP under ffn_up, with the gate rows first).
FUSED_QKV = ("attn_qkv.weight", ("attn_q.weight", "attn_k.weight", "attn_v.weight"))
FUSED_QKV_BIAS = ("attn_qkv.bias", ("attn_q.bias", "attn_k.bias", "attn_v.bias"))
FUSED_GATE_UP = ("ffn_up.weight", ("ffn_gate.weight", "ffn_up.weight"))


def _no_biases(config):
    return {"attention_bias": False, "mlp_bias": False}


def _none(*_):
    return {}


def _mistral_config_json(c):
    return {**_no_biases(c), "sliding_window": c.sliding_window or None}


@dataclass(frozen=True, eq=False)
class Family:
    arch: str                               # ModelConfig.arch and GGUF general.architecture
    hf_architectures: tuple[str, ...]       # config.json "architectures" (the first is written)
    hf_model_type: str                      # config.json "model_type"
    hf_defaults: dict = field(default_factory=dict)
    gguf_rope_neox: bool = False            # GGUF Q/K rows as stored: False: permuted for interleaved rope
    hf_rope_neox: bool = True               # HF Q/K rows: True: rotate-half pairs; False: interleaved (GLM-4)
    qkv_bias: bool = False                  # q/k/v projections have biases (o_proj never does)
    qk_norm: str | None = None              # RMSNorm of q, k before rope: "head" (per head) | "full" (whole row)
    norm: str = "rms"                       # the layer and final norms: "rms" (RMSNorm) | "layer" (LayerNorm with a bias)
    norms: tuple = PRE_NORM                 # the layer norms (PRE_NORM, POST_NORM or SANDWICH_NORM)
    fused: tuple = ()                       # (fused name, (part names)) its files hold: split by rows at load
    ffn_act: str = "silu"                   # the MLP: "silu" (SwiGLU, config.json hidden_act) | "gelu_tanh" (GeGLU)
    hf_layer_names: dict = field(default_factory=dict)   # HF layer tensor name -> ours, where it differs from Llama's
    hf_norm_offset: float = 0.0             # HF RMSNorm weights w scale by offset + w (Gemma: 1); ours hold offset + w
    window_all_layers: bool = False         # config.json / GGUF sliding_window applies to every layer (Mistral)
    hf_wrappers: dict = field(default_factory=dict)   # HF architecture holding this family's text model ->
    #                     (its config key, {its tensors' prefix: the prefix ours need}, prefixes of the rest, skipped)
    hf_config_extras: Callable = _no_biases  # what a written config.json adds for this family
    hf_options: Callable = _none             # config.json dict -> extra ModelConfig fields (ValueError if bad)
    gguf_options: Callable = _none           # (metadata reader, n_layers) -> extra ModelConfig fields
    gguf_extras: Callable = _none            # ModelConfig -> {GGUF key suffix: value} a written file adds
    model_class_path: str = "pyforge.models.llama:LlamaModel"
    gguf_arch: str = ""                      # GGUF general.architecture where it is not `arch` (Mixtral: llama)
    # MoE: (HF prefix of the experts, {HF name of an expert's tensor: our stem}); expert e of
    # layer i is model.layers.{i}.{prefix}{e}.{name} in HF files and blk.{i}.{stem}.{e}.weight here
    hf_experts: tuple = ()

    @property
    def gguf_architecture(self):
        return self.gguf_arch or self.arch

    @property
    def hf_eps_key(self):
        """config.json's epsilon of the layer and final norms."""
        return "layer_norm_eps" if self.norm == "layer" else "rms_norm_eps"

    @property
    def gguf_eps_key(self):
        """The GGUF key suffix of that epsilon (llama.cpp's)."""
        return "attention.layer_norm_epsilon" if self.norm == "layer" else "attention.layer_norm_rms_epsilon"

    @property
    def moe(self):
        return bool(self.hf_experts)

    def model_class(self):
        module, name = self.model_class_path.split(":")
        return getattr(importlib.import_module(module), name)


# -- family-specific config keys ----------------------------------------------
def _granite_hf(cfg):
    return {"embedding_scale": cfg.get("embedding_multiplier", 1.0),
            "residual_scale": cfg.get("residual_multiplier", 1.0),
            "attention_scale": cfg.get("attention_multiplier", 1.0),
            "logit_scale": cfg.get("logits_scaling", 1.0)}


def _granite_gguf(number, n_layers):
    return {"embedding_scale": number("embedding_scale", float, 1.0),
            "residual_scale": number("residual_scale", float, 1.0),
            "attention_scale": number("attention.scale", float, 1.0),
            "logit_scale": number("logit_scale", float, 1.0)}


def _granite_config_json(c):
    return {**_no_biases(c), "embedding_multiplier": c.embedding_scale, "residual_multiplier": c.residual_scale,
            "attention_multiplier": c.attention_scale, "logits_scaling": c.logit_scale}


def _granite_gguf_keys(c):
    return {"embedding_scale": c.embedding_scale, "residual_scale": c.residual_scale,
            "attention.scale": c.attention_scale, "logit_scale": c.logit_scale}


SMOLLM3_NOPE_INTERVAL = 4     # every 4th layer skips rope (llama.cpp's fixed step; transformers' default)


def _interval_nope_layers(n_layers, interval=SMOLLM3_NOPE_INTERVAL):
    return tuple(i for i in range(n_layers) if (i + 1) % interval == 0)


def _smollm3_hf(cfg):
    """transformers' no_rope_layers[i] is 1 where layer i *uses* rope (0: NoPE)."""
    flags = cfg.get("no_rope_layers")
    if flags is None:
        interval = cfg.get("no_rope_layer_interval", SMOLLM3_NOPE_INTERVAL)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"no_rope_layer_interval must be a positive integer, got {interval!r}")
        return {"nope_layers": _interval_nope_layers(cfg.get("num_hidden_layers", 0), interval)}
    n_layers = cfg.get("num_hidden_layers")
    if not isinstance(flags, list) or len(flags) != n_layers or not all(f in (0, 1) for f in flags):
        raise ValueError(f"no_rope_layers must be a list of 0/1 flags, one per layer ({n_layers}), "
                         f"got {str(flags)[:80]}")
    return {"nope_layers": tuple(i for i, use_rope in enumerate(flags) if not use_rope)}


def _smollm3_config_json(c):
    return {**_no_biases(c), "no_rope_layers": [int(i not in c.nope_layers) for i in range(c.n_layers)],
            "use_sliding_window": False}


# Gemma 1/2/3: GeGLU, (1 + w) norms, embeddings times sqrt(hidden), a tied head; 2 and 3 add
# sandwich norms, sliding-window layers and (2) soft caps, 3 q/k norms (models/gemma.py).
_GEMMA = dict(gguf_rope_neox=True, ffn_act="gelu_tanh", hf_norm_offset=1.0,
              model_class_path="pyforge.models.gemma:GemmaModel")
_GEMMA2_NAMES = {"post_attention_layernorm.weight": "post_attention_norm.weight",
                 "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                 "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}


# StableLM 2: LayerNorms with biases, partial rotary (rotate-half on the first n_rot dims),
# optional q/k/v biases; the 12B's per-head q/k LayerNorms and parallel residual are refused.
def _stablelm_hf(cfg):
    for key, what in (("qk_layernorm", "per-head q/k LayerNorms"), ("use_parallel_residual", "a parallel residual")):
        if cfg.get(key, False) is not False:
            raise ValueError(f"{key}={cfg[key]!r} ({what}, StableLM 2 12B) is not supported")
    bias = cfg.get("use_qkv_bias", False)
    if not isinstance(bias, bool):
        raise ValueError(f"use_qkv_bias must be a bool, got {bias!r}")
    return {"attn_bias": bias}


def _stablelm_config_json(c):
    return {"use_qkv_bias": c.attn_bias, "qk_layernorm": False, "use_parallel_residual": False,
            "partial_rotary_factor": c.n_rot / c.head_dim,
            "hidden_dropout": 0.0, "attention_dropout": 0.0}


_STABLELM_NORM_BIASES = {"input_layernorm.bias": "attn_norm.bias", "post_attention_layernorm.bias": "ffn_norm.bias"}


# -- mixture of experts ---------------------------------------------------------
MOE_MODEL = "pyforge.models.moe:MoeModel"


def _hf_int(cfg, key, default=None):
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{key} must be an integer, got {v!r}")
    return v


def _mixtral_hf(cfg):
    return {"n_experts": _hf_int(cfg, "num_local_experts", 8), "n_experts_used": _hf_int(cfg, "num_experts_per_tok", 2),
            "expert_ffn_size": _hf_int(cfg, "intermediate_size")}


def _qwen3_moe_hf(cfg):
    """transformers' rule: layer i is sparse unless in mlp_only_layers or (i + 1) % decoder_sparse_step."""
    n_layers, step = _hf_int(cfg, "num_hidden_layers"), _hf_int(cfg, "decoder_sparse_step", 1)
    only = cfg.get("mlp_only_layers") or []
    if step < 1:
        raise ValueError(f"decoder_sparse_step must be positive, got {step}")
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise ValueError(f"mlp_only_layers must be a list of layer indices, got {str(only)[:80]}")
    norm = cfg.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise ValueError(f"norm_topk_prob must be a bool, got {norm!r}")
    return {"n_experts": _hf_int(cfg, "num_experts", 128), "n_experts_used": _hf_int(cfg, "num_experts_per_tok", 8),
            "expert_ffn_size": _hf_int(cfg, "moe_intermediate_size", 768), "norm_topk_prob": norm,
            "dense_layers": tuple(i for i in range(n_layers) if i in only or (i + 1) % step)}


def _mixtral_config_json(c):
    return {**_no_biases(c), "num_local_experts": c.n_experts, "num_experts_per_tok": c.n_experts_used,
            "sliding_window": None, "router_jitter_noise": 0.0}


def _qwen3_moe_config_json(c):
    dense = set(c.dense_layers)
    step = next((s for s in range(c.n_layers, 0, -1)
                 if {i for i in range(c.n_layers) if (i + 1) % s} <= dense), 1)
    only = sorted(dense - {i for i in range(c.n_layers) if (i + 1) % step})
    return {**_no_biases(c), "use_sliding_window": False, "sliding_window": None, "max_window_layers": c.n_layers,
            "num_experts": c.n_experts, "num_experts_per_tok": c.n_experts_used,
            "moe_intermediate_size": c.expert_ffn_size, "norm_topk_prob": c.norm_topk_prob,
            "decoder_sparse_step": step, "mlp_only_layers": only}


def _moe_gguf(expert_ffn_key):
    """GGUF options of a MoE family: llama.cpp renormalises the top-k weights of both and has no
    dense layers in them."""
    def options(number, n_layers):
        return {"n_experts": number("expert_count", int), "n_experts_used": number("expert_used_count", int),
                "expert_ffn_size": number(expert_ffn_key, int), "norm_topk_prob": True, "dense_layers": ()}
    return options


FAMILIES = {f.arch: f for f in (
    Family("llama", ("LlamaForCausalLM",), "llama", {"max_position_embeddings": 2048, **_ROPE_EPS}),
    Family("mistral", ("MistralForCausalLM",), "mistral",
           {"max_position_embeddings": 4096 * 32, "sliding_window": 4096, **_ROPE_EPS},
           window_all_layers=True, hf_config_extras=_mistral_config_json),
    Family("qwen2", ("Qwen2ForCausalLM",), "qwen2", {"max_position_embeddings": 32768, **_ROPE_EPS},
           gguf_rope_neox=True, qkv_bias=True,
           hf_config_extras=lambda c: {"use_sliding_window": False, "sliding_window": None,
                                       "max_window_layers": c.n_layers}),
    Family("qwen3", ("Qwen3ForCausalLM",), "qwen3",
           {"max_position_embeddings": 32768, "head_dim": 128, **_ROPE_EPS},
           gguf_rope_neox=True, qk_norm="head",
           hf_config_extras=lambda c: {**_no_biases(c), "use_sliding_window": False, "sliding_window": None,
                                       "max_window_layers": c.n_layers}),
    Family("phi3", ("Phi3ForCausalLM",), "phi3", {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                                                  "rope_theta": 10000.0},
           gguf_rope_neox=True, fused=(FUSED_QKV, FUSED_GATE_UP),
           hf_layer_names={"self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight"},
           hf_config_extras=lambda c: {"sliding_window": None}),
    Family("granite", ("GraniteForCausalLM",), "granite", {"max_position_embeddings": 2048, **_ROPE_EPS},
           hf_config_extras=_granite_config_json, hf_options=_granite_hf, gguf_options=_granite_gguf,
           gguf_extras=_granite_gguf_keys),
    Family("olmo2", ("Olmo2ForCausalLM",), "olmo2", {"max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                                                     "rope_theta": 10000.0},
           gguf_rope_neox=True, qk_norm="full", norms=POST_NORM,
           hf_layer_names={"post_attention_layernorm.weight": "post_attention_norm.weight",
                           "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}),
    Family("smollm3", ("SmolLM3ForCausalLM",), "smollm3", {"max_position_embeddings": 32768, **_ROPE_EPS},
           hf_config_extras=_smollm3_config_json, hf_options=_smollm3_hf,
           gguf_options=lambda number, n_layers: {"nope_layers": _interval_nope_layers(n_layers)}),
    Family("glm4", ("Glm4ForCausalLM",), "glm4",
           {"max_position_embeddings": 131072, "head_dim": 128, "partial_rotary_factor": 0.5,
            "rms_norm_eps": 1.5625e-07, "rope_theta": 10000.0},
           hf_rope_neox=False, qkv_bias=True, norms=SANDWICH_NORM, fused=(FUSED_GATE_UP,),
           hf_layer_names={"post_self_attn_layernorm.weight": "post_attention_norm.weight",
                           "post_attention_layernorm.weight": "ffn_norm.weight",
                           "post_mlp_layernorm.weight": "post_ffw_norm.weight",
                           "mlp.gate_up_proj.weight": "ffn_up.weight"},
           hf_config_extras=lambda c: {"attention_bias": True, "partial_rotary_factor": c.n_rot / c.head_dim}),
    Family("stablelm", ("StableLmForCausalLM",), "stablelm",
           {"max_position_embeddings": 4096, "layer_norm_eps": 1e-5, "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25},
           gguf_rope_neox=True, norm="layer", hf_layer_names=_STABLELM_NORM_BIASES,
           hf_config_extras=_stablelm_config_json, hf_options=_stablelm_hf),
    Family("gemma", ("GemmaForCausalLM",), "gemma", {"max_position_embeddings": 8192, **_GEMMA_DEFAULTS, **_ROPE_EPS},
           **_GEMMA, **gemma_options.family_options(1)),
    Family("gemma2", ("Gemma2ForCausalLM",), "gemma2",
           {"max_position_embeddings": 8192, **_GEMMA_DEFAULTS, **_ROPE_EPS},
           norms=SANDWICH_NORM, hf_layer_names=_GEMMA2_NAMES, **_GEMMA, **gemma_options.family_options(2)),
    Family("gemma3", ("Gemma3ForCausalLM",), "gemma3_text",
           {"max_position_embeddings": 131072, **_GEMMA_DEFAULTS, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0},
           norms=SANDWICH_NORM, qk_norm="head", hf_layer_names=_GEMMA2_NAMES, **_GEMMA,
           hf_wrappers={"Gemma3ForConditionalGeneration": (     # the image-text Gemma 3 (4B and up): its text
               "text_config", {"language_model.": "", "model.language_model.": "model."},     # model alone
               ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."))},
           **gemma_options.family_options(3)),
    Family("mixtral", ("MixtralForCausalLM",), "mixtral",
           {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0},
           gguf_arch="llama", model_class_path=MOE_MODEL,
           hf_layer_names={"block_sparse_moe.gate.weight": "ffn_gate_inp.weight"},
           hf_experts=("block_sparse_moe.experts.", {"w1.weight": "ffn_gate", "w3.weight": "ffn_up",
                                                     "w2.weight": "ffn_down"}),
           hf_config_extras=_mixtral_config_json, hf_options=_mixtral_hf,
           gguf_options=_moe_gguf("feed_forward_length")),
    Family("qwen3moe", ("Qwen3MoeForCausalLM",), "qwen3_moe",
           {"max_position_embeddings": 32768, **_ROPE_EPS},
           gguf_rope_neox=True, qk_norm="head", model_class_path=MOE_MODEL,
           hf_layer_names={"mlp.gate.weight": "ffn_gate_inp.weight"},
           hf_experts=("mlp.experts.", {"gate_proj.weight": "ffn_gate", "up_proj.weight": "ffn_up",
                                        "down_proj.weight": "ffn_down"}),
           hf_config_extras=_qwen3_moe_config_json, hf_options=_qwen3_moe_hf,
           gguf_options=_moe_gguf("expert_feed_forward_length")),
)}
SUPPORTED = ", ".join(FAMILIES)


def family(arch):
    """The Family of `arch`; ValueError naming the supported ones."""
    try:
        return FAMILIES[arch]
    except (KeyError, TypeError):
        raise ValueError(f"unsupported architecture {arch!r} (supported: {SUPPORTED})") from None


def family_of_gguf(arch, metadata):
    """The Family of a GGUF file's general.architecture (a "llama" file with experts is Mixtral's), or None."""
    candidates = [f for f in FAMILIES.values() if arch in (f.gguf_architecture, f.arch)]
    experts = metadata.get(f"{arch}.expert_count") or 0
    moe = isinstance(experts, int) and experts > 0
    return next((f for f in candidates if f.moe == moe), candidates[0] if candidates else None)


def family_of_hf_config(config):
    """The Family a config.json dict names (its `architectures`, else its `model_type`), or None."""
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        found = next((f for f in FAMILIES.values() if archs[0] in f.hf_architectures or archs[0] in f.hf_wrappers),
                     None)
        if found is not None:
            return found
    return next((f for f in FAMILIES.values() if f.hf_model_type == config.get("model_type")), None)
