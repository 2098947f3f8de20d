"""Model families as data: one entry per family holds its names (our `arch`, which
is also GGUF's general.architecture; Hugging Face `architectures` and
`model_type`), the config defaults transformers assumes, the rope style and bias
layout of its files, and its model class. Adding a Llama-shaped family is one
entry here; a new block shape is one model file plus its entry. Nothing outside
this file and a family's model file asks which family a model is.

The tensor names are llama.cpp's GGUF names for every family here
(pyforge/loader/names.py maps the Hugging Face ones to them).
"""
import importlib
from dataclasses import dataclass, field
from typing import Callable

# transformers' defaults, where a config.json leaves a field out
_ROPE_EPS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0}


def _no_biases(config):
    return {"attention_bias": False, "mlp_bias": False}


@dataclass(frozen=True, eq=False)
class Family:
    arch: str                               # ModelConfig.arch and GGUF general.architecture
    hf_architectures: tuple[str, ...]       # config.json "architectures" (the first is written)
    hf_model_type: str                      # config.json "model_type"
    hf_defaults: dict = field(default_factory=dict)
    gguf_rope_neox: bool = False            # GGUF Q/K rows as stored: False: permuted for interleaved rope
    qkv_bias: bool = False                  # q/k/v projections have biases (o_proj never does)
    context_is_sliding_window: bool = False  # config.json sliding_window caps the context (we attend to all)
    hf_config_extras: Callable = _no_biases  # what a written config.json adds for this family
    model_class_path: str = "pyforge.models.llama:LlamaModel"

    def model_class(self):
        module, name = self.model_class_path.split(":")
        return getattr(importlib.import_module(module), name)


FAMILIES = {f.arch: f for f in (
    Family("llama", ("LlamaForCausalLM",), "llama", {"max_position_embeddings": 2048, **_ROPE_EPS}),
    Family("mistral", ("MistralForCausalLM",), "mistral", {"max_position_embeddings": 4096 * 32, **_ROPE_EPS},
           context_is_sliding_window=True),
    Family("qwen2", ("Qwen2ForCausalLM",), "qwen2", {"max_position_embeddings": 32768, **_ROPE_EPS},
           gguf_rope_neox=True, qkv_bias=True,
           hf_config_extras=lambda c: {"use_sliding_window": False, "sliding_window": None,
                                       "max_window_layers": c.n_layers}),
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
        found = next((f for f in FAMILIES.values() if archs[0] in f.hf_architectures), None)
        if found is not None:
            return found
    return next((f for f in FAMILIES.values() if f.hf_model_type == config.get("model_type")), None)
