"""A human-readable summary of a model file (`pyforge inspect`)."""
from collections import Counter

from pyforge.tokenizer import load_tokenizer
from pyforge.loader import load_model_file


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


def _experts_line(cfg):
    weights = "renormalised" if cfg.norm_topk_prob else "not renormalised"
    dense = f", dense ffn in layers {list(cfg.dense_layers)}" if cfg.dense_layers else ""
    return (f"experts:       {cfg.n_experts}, top {cfg.n_experts_used} per token ({weights}), "
            f"expert ffn {cfg.expert_ffn_size}{dense}")


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
