"""Model families as data: one entry per family holds its names (our `arch`, which
is also GGUF's general.architecture; Hugging Face `architectures` and
`model_type`), the config defaults transformers assumes, the rope style, bias and
norm layout and tensor names of its files, the config keys only it has, and its
model class. Adding a Llama-shaped family is one
entry here; a new block shape is one model file plus its entry. Nothing outside
this file and a family's model file asks which family a model is.

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

# Which norms a decoder layer has (llama.cpp's names): before each block (pre), and on
# each block's output before the residual add as well (sandwich: Gemma 2/3).
PRE_NORM = ("attn_norm", "ffn_norm")
SANDWICH_NORM = PRE_NORM + ("post_attention_norm", "post_ffw_norm")


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
    qkv_bias: bool = False                  # q/k/v projections have biases (o_proj never does)
    ffn_act: str = "silu"                   # the MLP: "silu" (SwiGLU, config.json hidden_act) | "gelu_tanh" (GeGLU)
    qk_norm: str | None = None              # RMSNorm of q and k before rope: "head" (per head, Gemma 3)
    norms: tuple = PRE_NORM                 # the layer norms (PRE_NORM or SANDWICH_NORM)
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

    def model_class(self):
        module, name = self.model_class_path.split(":")
        return getattr(importlib.import_module(module), name)


# Gemma 1/2/3: GeGLU, (1 + w) norms, embeddings times sqrt(hidden), a tied head; 2 and 3 add
# sandwich norms, sliding-window layers and (2) soft caps, 3 q/k norms (models/gemma.py).
_GEMMA = dict(gguf_rope_neox=True, ffn_act="gelu_tanh", hf_norm_offset=1.0,
              model_class_path="pyforge.models.gemma:GemmaModel")
_GEMMA2_NAMES = {"post_attention_layernorm.weight": "post_attention_norm.weight",
                 "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                 "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
                 "self_attn.q_norm.weight": "attn_q_norm.weight",
                 "self_attn.k_norm.weight": "attn_k_norm.weight"}

FAMILIES = {f.arch: f for f in (
    Family("llama", ("LlamaForCausalLM",), "llama", {"max_position_embeddings": 2048, **_ROPE_EPS}),
    Family("mistral", ("MistralForCausalLM",), "mistral",
           {"max_position_embeddings": 4096 * 32, "sliding_window": 4096, **_ROPE_EPS},
           window_all_layers=True, hf_config_extras=_mistral_config_json),
    Family("qwen2", ("Qwen2ForCausalLM",), "qwen2", {"max_position_embeddings": 32768, **_ROPE_EPS},
           gguf_rope_neox=True, qkv_bias=True,
           hf_config_extras=lambda c: {"use_sliding_window": False, "sliding_window": None,
                                       "max_window_layers": c.n_layers}),
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
)}
SUPPORTED = ", ".join(FAMILIES)


def family(arch):
    """The Family of `arch`; ValueError naming the supported ones."""
    try:
        return FAMILIES[arch]
    except (KeyError, TypeError):
        raise ValueError(f"unsupported architecture {arch!r} (supported: {SUPPORTED})") from None


def family_of_hf_config(config):
    """The Family a config.json dict names (its `architectures`, else its `model_type`), or None."""
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        found = next((f for f in FAMILIES.values() if archs[0] in f.hf_architectures or archs[0] in f.hf_wrappers),
                     None)
        if found is not None:
            return found
    return next((f for f in FAMILIES.values() if f.hf_model_type == config.get("model_type")), None)
