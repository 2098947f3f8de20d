"""Canonical tensor names (llama.cpp's GGUF names) and the Hugging Face map.

Every loader hands the model tensors under these names, in numpy order
(rows first: a weight matrix is (n_out, n_in)):

    token_embd.weight            (vocab, hidden)
    output_norm.weight           (hidden,)
    output_norm.bias             (hidden,)            LayerNorm families (StableLM): every norm has a bias
    output.weight                (vocab, hidden)      absent when tied
    rope_freqs.weight            (n_rot // 2,)        optional (Llama 3 GGUF)
    blk.{i}.attn_norm.weight     (hidden,)
    blk.{i}.attn_q.weight        (n_heads * head_dim, hidden)
    blk.{i}.attn_k.weight        (n_kv_heads * head_dim, hidden)
    blk.{i}.attn_v.weight        (n_kv_heads * head_dim, hidden)
    blk.{i}.attn_q.bias / attn_k.bias / attn_v.bias     Qwen2, GLM-4
    blk.{i}.attn_q_norm.weight   (head_dim,) per head (Qwen3, Gemma 3) | (n_heads * head_dim,) whole (OLMo 2)
    blk.{i}.attn_k_norm.weight   (head_dim,) | (n_kv_heads * head_dim,)
    blk.{i}.attn_output.weight   (hidden, n_heads * head_dim)
    blk.{i}.post_attention_norm.weight (hidden,)      post-norm families (OLMo 2, GLM-4, Gemma 2/3)
    blk.{i}.ffn_norm.weight      (hidden,)            absent in OLMo 2
    blk.{i}.ffn_gate.weight      (ffn, hidden)
    blk.{i}.ffn_up.weight        (ffn, hidden)
    blk.{i}.ffn_down.weight      (hidden, ffn)
    blk.{i}.post_ffw_norm.weight (hidden,)            post-norm families
    MoE layers (config.moe_layers) instead of ffn_gate/up/down:
    blk.{i}.ffn_gate_inp.weight  (n_experts, hidden)  the router
    blk.{i}.ffn_gate.{e}.weight  (expert_ffn, hidden) expert e, e < n_experts (llama.cpp's older layout;
    blk.{i}.ffn_up.{e}.weight    (expert_ffn, hidden)  its merged ffn_*_exps tensors, [n_experts, rows,
    blk.{i}.ffn_down.{e}.weight  (hidden, expert_ffn)  cols], are split into these at load: split_experts)

A family's fused tensors (registry.Family.fused: Phi-3's attn_qkv, the gate+up
ffn_up of Phi-3 and GLM-4) are split by rows into these names at load
(split_fused), zero-copy: rows of every stored type are whole blocks. A family's
other HF names that differ from Llama's are in its registry entry (hf_layer_names:
Gemma 2's post_attention_layernorm is a post-norm, not ffn_norm).
"""
import re

from pyforge.models.registry import FUSED_GATE_UP, FUSED_QKV, FUSED_QKV_BIAS, family

ALL_FUSED = (FUSED_QKV, FUSED_QKV_BIAS, FUSED_GATE_UP)

HF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "model.norm.bias": "output_norm.bias",           # LayerNorm families (StableLM)
    "lm_head.weight": "output.weight",
}

HF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

# Present in some older checkpoints, recomputed by every runtime.
HF_IGNORED_LAYER = {"self_attn.rotary_emb.inv_freq"}

_HF_LAYER_RE = re.compile(r"model\.layers\.(0|[1-9][0-9]{0,5})\.(.+)")
_BLK_RE = re.compile(r"blk\.(0|[1-9][0-9]{0,5})\.(.+)")

_EXPERT_RE = re.compile(r"(0|[1-9][0-9]{0,4})\.(.+)")                     # HF: {e}.{name}
_CANON_EXPERT_RE = re.compile(r"(ffn_gate|ffn_up|ffn_down)\.(0|[1-9][0-9]{0,4})\.weight")   # ours
MERGED_EXPERTS = {"ffn_gate_exps.weight": "ffn_gate", "ffn_up_exps.weight": "ffn_up",
                  "ffn_down_exps.weight": "ffn_down"}     # llama.cpp's merged [n_experts, rows, cols] tensors

_CANON_TO_HF_GLOBAL = {v: k for k, v in HF_GLOBAL.items()}
_CANON_TO_HF_LAYER = {v: k for k, v in HF_LAYER.items()}

IGNORE = ""   # hf_to_canonical's answer for tensors that carry nothing we use


# Q/K norms (Qwen3, OLMo 2): the same HF names in every family that has them
HF_LAYER_COMMON = {
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}


def _layer_map(fam):
    """HF layer tensor name -> ours for a family (Llama's names, the family's own on top)."""
    if fam is None:
        return HF_LAYER
    overridden = set(fam.hf_layer_names.values())
    base = {k: v for k, v in {**HF_LAYER, **HF_LAYER_COMMON}.items() if v not in overridden}
    return {**base, **fam.hf_layer_names}


def hf_to_canonical(name, fam=None):
    """Canonical name for a HF tensor name of a family (default: Llama's names), IGNORE for
    ignorable ones, None if unknown. Fused tensors get the name they are split from."""
    if name in HF_GLOBAL:
        return HF_GLOBAL[name]
    m = _HF_LAYER_RE.fullmatch(name)
    if not m:
        return None
    layer, rest = m.groups()
    if rest in HF_IGNORED_LAYER:
        return IGNORE
    layer_map = _layer_map(fam)
    if rest in layer_map:
        return f"blk.{layer}.{layer_map[rest]}"
    if fam is not None and fam.moe:
        prefix, stems = fam.hf_experts
        m = _EXPERT_RE.fullmatch(rest[len(prefix):]) if rest.startswith(prefix) else None
        if m and m.group(2) in stems:
            return f"blk.{layer}.{stems[m.group(2)]}.{m.group(1)}.weight"
    return None


def canonical_to_hf(name, fam=None):
    """The HF name for a canonical name (the inverse of hf_to_canonical)."""
    if name in _CANON_TO_HF_GLOBAL:
        return _CANON_TO_HF_GLOBAL[name]
    m = _BLK_RE.fullmatch(name)
    inverse = _CANON_TO_HF_LAYER if fam is None else {v: k for k, v in _layer_map(fam).items()}
    if m and m.group(2) in inverse:
        return f"model.layers.{m.group(1)}.{inverse[m.group(2)]}"
    expert = _CANON_EXPERT_RE.fullmatch(m.group(2)) if m and fam is not None and fam.moe else None
    if expert:
        prefix, stems = fam.hf_experts
        names = {stem: hf for hf, stem in stems.items()}
        return f"model.layers.{m.group(1)}.{prefix}{expert.group(2)}.{names[expert.group(1)]}"
    raise KeyError(f"no Hugging Face name for tensor {name!r}")


def expected_shapes(config):
    """{canonical name: numpy shape} of every tensor the config requires."""
    c, fam = config, family(config.arch)
    shapes = {
        "token_embd.weight": (c.vocab_size, c.hidden_size),
        "output_norm.weight": (c.hidden_size,),
    }
    if not c.tie_embeddings:
        shapes["output.weight"] = (c.vocab_size, c.hidden_size)
    if fam.norm == "layer":
        shapes["output_norm.bias"] = (c.hidden_size,)
    qk_norms = {"head": (c.head_dim, c.head_dim), "full": (c.q_dim, c.kv_dim)}.get(fam.qk_norm)
    for i in range(c.n_layers):
        p = f"blk.{i}."
        shapes.update({p + f"{norm}.weight": (c.hidden_size,) for norm in fam.norms})
        if fam.norm == "layer":
            shapes.update({p + f"{norm}.bias": (c.hidden_size,) for norm in fam.norms})
        shapes.update({
            p + "attn_q.weight": (c.q_dim, c.hidden_size),
            p + "attn_k.weight": (c.kv_dim, c.hidden_size),
            p + "attn_v.weight": (c.kv_dim, c.hidden_size),
            p + "attn_output.weight": (c.hidden_size, c.q_dim),
        })
        shapes.update(_expert_shapes(c, p) if i in c.moe_layers else {
            p + "ffn_gate.weight": (c.ffn_size, c.hidden_size),
            p + "ffn_up.weight": (c.ffn_size, c.hidden_size),
            p + "ffn_down.weight": (c.hidden_size, c.ffn_size),
        })
        if qk_norms:
            shapes[p + "attn_q_norm.weight"] = (qk_norms[0],)
            shapes[p + "attn_k_norm.weight"] = (qk_norms[1],)
        if c.attn_bias:
            shapes.update({
                p + "attn_q.bias": (c.q_dim,),
                p + "attn_k.bias": (c.kv_dim,),
                p + "attn_v.bias": (c.kv_dim,),
            })
    return shapes


def _expert_shapes(c, p):
    """The router and every expert's matrices of a MoE layer (prefix p)."""
    shapes = {p + "ffn_gate_inp.weight": (c.n_experts, c.hidden_size)}
    for stem, shape in expert_matrix_shapes(c).items():
        shapes.update({f"{p}{stem}.{e}.weight": shape for e in range(c.n_experts)})
    return shapes


def expert_matrix_shapes(c):
    """{stem: one expert's matrix shape} (ffn_gate, ffn_up, ffn_down)."""
    f, d = c.expert_ffn_size, c.hidden_size
    return {"ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}


def split_experts(path, config, tensors):
    """Replace llama.cpp's merged expert tensors (blk.{i}.ffn_*_exps.weight, [n_experts, rows, cols])
    by one tensor per expert: zero-copy views, any stored type (an expert is whole rows)."""
    from pyforge.loader import ModelFileError, TensorRef      # the loader package imports this module

    shapes = expert_matrix_shapes(config)
    for i in config.moe_layers:
        for merged, stem in MERGED_EXPERTS.items():
            ref = tensors.pop(f"blk.{i}.{merged}", None)
            if ref is None:
                continue
            expected = (config.n_experts, *shapes[stem])
            if tuple(ref.shape) != expected:
                raise ModelFileError(path, f"tensor blk.{i}.{merged} has shape {tuple(ref.shape)}, expected {expected}")
            for e in range(config.n_experts):
                name = f"blk.{i}.{stem}.{e}.weight"
                if name in tensors:
                    raise ModelFileError(path, f"tensor {name} is in the file both merged ({merged}) and on its own")
                tensors[name] = TensorRef(name, ref.ggml_type, shapes[stem], ref.data[e])
    return tensors


def optional_shapes(config):
    """Tensors a model may carry but need not."""
    half = (config.n_rot // 2,)
    return {"rope_freqs.weight": half, "rope_factors_long.weight": half, "rope_factors_short.weight": half}


def fused_shapes(config, shapes, fused_forms=None):
    """[(fused name, its shape, [(part name, part shape)])] per layer: of the family's fused
    tensors (what its files hold), or of the fused forms given whose parts the model has."""
    out = []
    for i in range(config.n_layers):
        for fused, parts in family(config.arch).fused if fused_forms is None else fused_forms:
            if any(f"blk.{i}.{part}" not in shapes for part in parts):
                continue
            named = [(f"blk.{i}.{part}", shapes[f"blk.{i}.{part}"]) for part in parts]
            rows = sum(shape[0] for _, shape in named)
            out.append((f"blk.{i}.{fused}", (rows, *named[0][1][1:]), named))
    return out


def split_fused(path, config, tensors):
    """Replace each fused tensor (whole rows of its parts, in order) by its parts: zero-copy row
    slices, any stored type. Any family's file may fuse q/k/v (llama.cpp loads either form);
    a tensor already of its part's shape (an unfused ffn_up) is kept."""
    from pyforge.loader import ModelFileError, TensorRef      # the loader package imports this module

    shapes = expected_shapes(config)
    for fused, shape, parts in fused_shapes(config, shapes, ALL_FUSED):
        ref = tensors.get(fused)
        if ref is None or (fused in dict(parts) and tuple(ref.shape) == dict(parts)[fused]):
            continue
        if tuple(ref.shape) != shape:
            raise ModelFileError(path, f"fused tensor {fused} has shape {tuple(ref.shape)}, expected {shape} "
                                       f"(rows of {', '.join(name for name, _ in parts)})")
        del tensors[fused]
        row = 0
        for name, part_shape in parts:
            if name in tensors:
                raise ModelFileError(path, f"tensor {name} is in the file both fused ({fused}) and on its own")
            rows = part_shape[0]
            tensors[name] = TensorRef(name, ref.ggml_type, part_shape, ref.data[row:row + rows])
            row += rows
    return tensors
