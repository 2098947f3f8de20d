"""The Llama family (Llama 2/3, TinyLlama, Mistral, Qwen2) over backend primitives.

One definition: config switches biases (Qwen2), tied heads, rope style, rope
scaling and sliding-window layers (Mistral). The forward pass runs a flattened
varlen batch against the paged KV cache, so one sequence or many take the same path.
"""
import math
from dataclasses import dataclass

from pyforge.models.rope_scaling import freq_factors_for


@dataclass
class LayerWeights:
    attn_norm: object
    wq: object
    wk: object
    wv: object
    wo: object
    bq: object
    bk: object
    bv: object
    ffn_norm: object
    w_gate: object
    w_up: object
    w_down: object


class LlamaModel:
    def __init__(self, model_file, backend):
        self.config = cfg = model_file.config
        self.backend = backend
        t = model_file.tensors   # shapes already checked against the config by the loader
        embd = t["token_embd.weight"]
        self.token_embd = backend.prepare_embedding(embd)
        self.output_norm = backend.prepare_vector(t["output_norm.weight"])
        head = t.get("output.weight") or embd
        self.output = backend.prepare_weight(head)
        self.layers = [self.load_layer(t, i) for i in range(cfg.n_layers)]
        self.freq_factors = freq_factors_for(cfg, t)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def load_layer(self, t, i):
        b, p = self.backend, f"blk.{i}."

        def bias(name):
            return b.prepare_vector(t[p + name]) if p + name in t else None

        return LayerWeights(
            attn_norm=b.prepare_vector(t[p + "attn_norm.weight"]),
            wq=b.prepare_weight(t[p + "attn_q.weight"]),
            wk=b.prepare_weight(t[p + "attn_k.weight"]),
            wv=b.prepare_weight(t[p + "attn_v.weight"]),
            wo=b.prepare_weight(t[p + "attn_output.weight"]),
            bq=bias("attn_q.bias"),
            bk=bias("attn_k.bias"),
            bv=bias("attn_v.bias"),
            ffn_norm=b.prepare_vector(t[p + "ffn_norm.weight"]),
            w_gate=b.prepare_weight(t[p + "ffn_gate.weight"]),
            w_up=b.prepare_weight(t[p + "ffn_up.weight"]),
            w_down=b.prepare_weight(t[p + "ffn_down.weight"]),
        )

    def activation_bytes(self, n_tokens, n_rows):
        """The most activation memory one forward pass of n_tokens tokens with n_rows logits rows
        holds at once (the backend's activation dtype): what forward_device keeps alive, counted
        from its code. Throughout: the residual stream x, the norm scratch h and the last MLP
        output; then the larger of attention's buffers (q, k, v, its output, wo's) and the MLP's
        (gate, up, w_down's); then the logits rows, their norm, the logits and a float32 copy of
        them for the host (counted on top, though they come after the layers)."""
        cfg, e = self.config, self.backend.activation_dtype_bytes
        d, q, kv = cfg.hidden_size, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        per_token = 3 * d + max(2 * q + 2 * kv + d, 2 * cfg.ffn_size + d)
        return n_tokens * per_token * e + n_rows * (2 * d * e + cfg.vocab_size * (e + 4))

    def forward(self, batch, kv_cache):
        """Logits [len(batch.logits_rows), vocab] for the requested rows (float32 numpy, on the host)."""
        b = self.backend
        return b.to_host(b.run_forward(self.forward_device, batch, kv_cache))

    def forward_device(self, batch, kv_cache):
        """The forward pass over a batch already on the backend (prepare_batch's); logits stay there."""
        b = self.backend
        normed = self.final_hidden(batch, kv_cache)                                   # [rows, d]
        return b.matmul(normed, self.output, b.empty((len(normed), self.config.vocab_size)))

    def hidden(self, batch, kv_cache):
        """The final hidden state [len(batch.logits_rows), hidden_size] (after the final norm,
        before lm_head) of the requested rows, float32 numpy on the host: embeddings'. Run
        directly, never by a CUDA graph replay (graphs return logits)."""
        b = self.backend
        return b.to_host(self.final_hidden(b.prepare_batch(batch), kv_cache))

    def final_hidden(self, batch, kv_cache):
        """The batch's logits_rows of the final hidden state after the final norm, on the backend."""
        cfg, b = self.config, self.backend
        n = batch.n_tokens
        x = b.embed(batch.token_ids, self.token_embd, b.empty((n, cfg.hidden_size)))  # [n, d]
        h = b.empty((n, cfg.hidden_size))                                             # [n, d] scratch
        mlp_out = None      # each residual add goes with the norm after it (one launch on cuda)
        for i, layer in enumerate(self.layers):
            if mlp_out is None:
                b.rmsnorm(x, layer.attn_norm, cfg.rms_eps, h)
            else:
                b.add_rmsnorm(x, mlp_out, layer.attn_norm, cfg.rms_eps, h)
            b.add_rmsnorm(x, self.attention(layer, h, batch, *kv_cache.layer(i), layer_index=i), layer.ffn_norm,
                          cfg.rms_eps, h)
            mlp_out = self.mlp(layer, h)
        b.add_inplace(x, mlp_out)
        rows = x[batch.logits_rows] if len(batch.logits_rows) != n else x
        return b.rmsnorm(rows, self.output_norm, cfg.rms_eps, b.empty(rows.shape))      # [rows, d]

    def attention(self, layer, h, batch, k_cache, v_cache, layer_index=0):
        cfg, b = self.config, self.backend
        n, hd = batch.n_tokens, cfg.head_dim
        q = self.project(h, layer.wq, layer.bq).reshape(n, cfg.n_heads, hd)     # [n, H, hd]
        k = self.project(h, layer.wk, layer.bk).reshape(n, cfg.n_kv_heads, hd)  # [n, KV, hd]
        v = self.project(h, layer.wv, layer.bv).reshape(n, cfg.n_kv_heads, hd)  # [n, KV, hd]
        b.rope(q, batch.positions, cfg.n_rot, cfg.rope_theta, cfg.rope_neox, self.freq_factors)
        b.rope(k, batch.positions, cfg.n_rot, cfg.rope_theta, cfg.rope_neox, self.freq_factors)
        b.kv_store(k, v, k_cache, v_cache, batch.slot_mapping)
        attn = b.attention(q, k_cache, v_cache, batch, self.scale, b.empty(q.shape),
                           cfg.layer_window(layer_index))                                # [n, H, hd]
        return b.matmul(attn.reshape(n, -1), layer.wo, b.empty((n, cfg.hidden_size)))

    def project(self, h, weight, bias):
        out = self.backend.matmul(h, weight, self.backend.empty((h.shape[0], weight.shape[0])))
        if bias is not None:
            self.backend.add_bias(out, bias)
        return out

    def mlp(self, layer, h):
        b, n = self.backend, h.shape[0]
        gate = b.matmul(h, layer.w_gate, b.empty((n, self.config.ffn_size)))  # [n, ffn]
        up = b.matmul(h, layer.w_up, b.empty((n, self.config.ffn_size)))      # [n, ffn]
        act = b.silu_mul(gate, up, gate)
        return b.matmul(act, layer.w_down, b.empty((n, self.config.hidden_size)))
