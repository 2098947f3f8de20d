"""A human-readable summary of a model file (`pyforge inspect`)."""
from collections import Counter

from pyforge.backends import kv_dtype
from pyforge.tokenizer import load_tokenizer
from pyforge.loader import load_model_file
from pyforge.models.config import ModelConfig
from pyforge.models.registry import family


def describe(path, list_tensors=False):
    mf = load_model_file(path)
    try:
        cfg = mf.config
        n_params = sum(_numel(t.shape) for t in mf.tensors.values())
        n_bytes = sum(t.data.nbytes for t in mf.tensors.values())
        types = Counter(t.ggml_type.name for t in mf.tensors.values())
        lines = [
            f"file:          {path}",
            f"architecture:  {cfg.arch}",
            f"parameters:    {n_params:,} ({n_bytes / 2**20:.1f} MiB of weights)",
            f"layers:        {cfg.n_layers}, hidden {cfg.hidden_size}, ffn {cfg.ffn_size}",
            f"heads:         {cfg.n_heads} query, {cfg.n_kv_heads} kv, head dim {cfg.head_dim}",
            f"context:       {cfg.context_length}, rope theta {cfg.rope_theta:g}"
            f" ({'neox' if cfg.rope_neox else 'interleaved'}, {cfg.n_rot} dims)"
            + (f", scaling {cfg.rope_scaling}" if cfg.rope_scaling else ""),
            f"options:       {_options(cfg)}",
            f"KV cache:      {_kv_bytes_per_token(cfg)}",
            "tensor types:  " + ", ".join(f"{k} x{v}" for k, v in sorted(types.items())),
            f"vocab:         {cfg.vocab_size}",
        ]
        if cfg.n_experts:
            lines.insert(4, _experts_line(cfg))
        lines += _tokenizer_lines(mf)
        if list_tensors:
            lines += [f"  {name:40s} {t.ggml_type.name:6s} {t.shape}" for name, t in mf.tensors.items()]
        return "\n".join(lines)
    finally:
        mf.close()


# The config fields a family sets beyond a plain Llama's shape, and how to show them.
_OPTIONS = {
    "tie_embeddings": lambda v: "tied head",
    "attn_bias": lambda v: "q/k/v biases",
    "attention_scale": lambda v: f"attention scale {v:.6g}",
    "embedding_scale": lambda v: f"embeddings x {v:.6g}",
    "residual_scale": lambda v: f"block outputs x {v:.6g}",
    "logit_scale": lambda v: f"logits / {v:.6g}",
    "nope_layers": lambda v: f"no rope on layers {', '.join(map(str, v))}",
    "attn_softcap": lambda v: f"attention soft cap {v:g}",
    "final_softcap": lambda v: f"logit soft cap {v:g}",
    "rope_theta_local": lambda v: f"sliding layers' rope theta {v:g}",
}


def _options(cfg):
    """The family's options this model sets, or 'none'."""
    shown = [show(getattr(cfg, name)) for name, show in _OPTIONS.items()
             if getattr(cfg, name) != ModelConfig.__dataclass_fields__[name].default]
    if family(cfg.arch).norm == "layer":
        shown.append(f"LayerNorms (eps {cfg.rms_eps:g})")
    if cfg.sliding_window:
        shown.append(f"sliding window {cfg.sliding_window} on {len(cfg.sliding_layers)} of {cfg.n_layers} layers")
    return ", ".join(shown) or "none"


def _experts_line(cfg):
    weights = "renormalised" if cfg.norm_topk_prob else "not renormalised"
    dense = f", dense ffn in layers {list(cfg.dense_layers)}" if cfg.dense_layers else ""
    return (f"experts:       {cfg.n_experts}, top {cfg.n_experts_used} per token ({weights}), "
            f"expert ffn {cfg.expert_ffn_size}{dense}")


def _kv_bytes_per_token(cfg):
    """Bytes one cached token takes in each --kv-cache-dtype this model can use."""
    sizes = [f"{name} {kv_dtype.bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, name):,}"
             for name in kv_dtype.BYTES_PER_VALUE if name != "q8_0" or cfg.head_dim % 32 == 0]
    return "bytes per token " + ", ".join(sizes)


def _tokenizer_lines(mf):
    try:
        tok = load_tokenizer(mf)
    except ValueError as e:
        return [f"tokenizer:     unavailable ({e})"]
    template = tok.chat_template or "(none)"
    if len(template) > 300:
        template = template[:300] + " …"
    return [
        f"tokenizer:     {tok.vocab_size} tokens, bos {tok.bos_id}, eos {sorted(tok.eos_ids)}",
        f"chat template: {template}",
    ]


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n
