"""The Gemma family (Gemma 1, 2, 3 text) over backend primitives.

Against Llama's block: GeGLU (gelu-tanh) instead of SwiGLU; RMSNorm by
(1 + w), folded into the weights at load (loader/hf.py; GGUF stores them so);
embeddings times sqrt(hidden_size) in the activation dtype; a tied head. Gemma 2
and 3 add a norm on each block's output before its residual add (sandwich
norms), sliding-window layers, query_pre_attn_scalar as the attention scale;
Gemma 2 soft-caps attention scores and logits; Gemma 3 norms q and k per head
before rope, and its sliding layers use their own rope base, unscaled.
The options are config fields (models/config.py, read in gemma_options.py).
"""
from dataclasses import dataclass

from pyforge.models.llama import LayerWeights, LlamaModel


@dataclass
class GemmaLayerWeights(LayerWeights):
    post_attn_norm: object = None   # Gemma 2/3: on attention's output, before the residual add
    post_ffn_norm: object = None    # Gemma 2/3: on the MLP's output, likewise
    q_norm: object = None           # Gemma 3: [head_dim], each head of q (and k) before rope
    k_norm: object = None


class GemmaModel(LlamaModel):
    def __init__(self, model_file, backend):
        super().__init__(model_file, backend)
        cfg = self.config
        if cfg.attention_scale is not None:
            self.scale = cfg.attention_scale

    def load_layer(self, t, i):
        b, p = self.backend, f"blk.{i}."

        def vector(name):
            return b.prepare_vector(t[p + name]) if p + name in t else None

        return GemmaLayerWeights(
            **vars(super().load_layer(t, i)),
            post_attn_norm=vector("post_attention_norm.weight"),
            post_ffn_norm=vector("post_ffw_norm.weight"),
            q_norm=vector("attn_q_norm.weight"),
            k_norm=vector("attn_k_norm.weight"),
        )

    def forward_device(self, batch, kv_cache):
        logits = super().forward_device(batch, kv_cache)
        if self.config.final_softcap:
            self.backend.softcap(logits, self.config.final_softcap)
        return logits

    def final_hidden(self, batch, kv_cache):
        cfg, b = self.config, self.backend
        n, eps = batch.n_tokens, cfg.rms_eps
        x = b.embed(batch.token_ids, self.token_embd, b.empty((n, cfg.hidden_size)))  # [n, d]
        b.scale(x, cfg.embedding_scale)
        h = b.empty((n, cfg.hidden_size))                                             # [n, d] scratch
        mlp_out = None      # each residual add goes with the norm after it (one launch on cuda)
        for i, layer in enumerate(self.layers):
            if mlp_out is None:
                b.rmsnorm(x, layer.attn_norm, eps, h)
            else:
                b.add_rmsnorm(x, mlp_out, layer.attn_norm, eps, h)
            attn = self.post_norm(self.attention(layer, h, batch, *kv_cache.layer(i), layer_index=i),
                                  layer.post_attn_norm)
            b.add_rmsnorm(x, attn, layer.ffn_norm, eps, h)
            del attn        # not held through the MLP (activation_bytes counts it so)
            mlp_out = self.post_norm(self.mlp(layer, h), layer.post_ffn_norm)
        b.add_inplace(x, mlp_out)
        rows = x[batch.logits_rows] if len(batch.logits_rows) != n else x
        return b.rmsnorm(rows, self.output_norm, eps, b.empty(rows.shape))      # [rows, d]

    def post_norm(self, y, weight):
        """y normed in place by weight (a sandwich norm), or y as it is when the layer has none."""
        if weight is not None:
            self.backend.rmsnorm(y, weight, self.config.rms_eps, y)
        return y

    def attention(self, layer, h, batch, k_cache, v_cache, layer_index=0):
        cfg, b = self.config, self.backend
        n, hd = batch.n_tokens, cfg.head_dim
        q = self.project(h, layer.wq, layer.bq).reshape(n, cfg.n_heads, hd)      # [n, H, hd]
        k = self.project(h, layer.wk, layer.bk).reshape(n, cfg.n_kv_heads, hd)   # [n, KV, hd]
        v = self.project(h, layer.wv, layer.bv).reshape(n, cfg.n_kv_heads, hd)   # [n, KV, hd]
        if layer.q_norm is not None:
            self.post_norm(q.reshape(n * cfg.n_heads, hd), layer.q_norm)
            self.post_norm(k.reshape(n * cfg.n_kv_heads, hd), layer.k_norm)
        window = cfg.layer_window(layer_index)
        theta, freq_factors = self.rope_of(window)
        b.rope(q, batch.positions, cfg.n_rot, theta, cfg.rope_neox, freq_factors)
        b.rope(k, batch.positions, cfg.n_rot, theta, cfg.rope_neox, freq_factors)
        b.kv_store(k, v, k_cache, v_cache, batch.slot_mapping)
        attn = b.attention(q, k_cache, v_cache, batch, self.scale, b.empty(q.shape), window, cfg.attn_softcap)
        return b.matmul(attn.reshape(n, -1), layer.wo, b.empty((n, cfg.hidden_size)))  # [n, d]

    def rope_of(self, window):
        """(theta, freq factors) of a layer: Gemma 3's sliding layers have a rope of their own, unscaled."""
        if window and self.config.rope_theta_local is not None:
            return self.config.rope_theta_local, None
        return self.config.rope_theta, self.freq_factors

    def mlp(self, layer, h):
        b, n = self.backend, h.shape[0]
        gate = b.matmul(h, layer.w_gate, b.empty((n, self.config.ffn_size)))  # [n, ffn]
        up = b.matmul(h, layer.w_up, b.empty((n, self.config.ffn_size)))      # [n, ffn]
        act = b.gelu_tanh_mul(gate, up, gate)
        return b.matmul(act, layer.w_down, b.empty((n, self.config.hidden_size)))
