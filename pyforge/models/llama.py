"""The Llama-shaped decoder (Llama 2/3, TinyLlama, Mistral, Qwen2/3, Phi-3, Granite,
OLMo 2, SmolLM3, GLM-4, StableLM 2; Gemma through models/gemma.py) over backend primitives.

One definition; the model's tensors and config say what differs: q/k/v biases,
q/k RMSNorms (per head or over the whole projection), which layer norms there are
(pre-norms, post-norms on each block's output, or both) and their kind (RMSNorm, or
LayerNorm with a bias: StableLM), tied heads, rope style,
partial rotary dims, rope scaling, layers without rope, Granite's multipliers,
sliding-window layers (Mistral, Gemma 2/3) with their own rope base (Gemma 3), and
soft-capped attention scores and logits (Gemma 2). The forward pass runs a
flattened varlen batch against the paged KV cache, so one sequence or many take
the same path.
"""
import math
from dataclasses import dataclass

from pyforge.models.registry import family
from pyforge.models.rope_scaling import freq_factors_for, longrope_attention_factor


@dataclass
class LayerWeights:
    wq: object
    wk: object
    wv: object
    wo: object
    w_gate: object
    w_up: object
    w_down: object
    attn_norm: object = None         # pre-norms (None: the block reads the residual stream itself)
    ffn_norm: object = None
    attn_norm_bias: object = None    # the pre-norms' biases (LayerNorm families)
    ffn_norm_bias: object = None
    attn_post_norm: object = None    # post-norms of the blocks' outputs
    ffn_post_norm: object = None
    bq: object = None
    bk: object = None
    bv: object = None
    q_norm: object = None            # [head_dim] per head, or [n_heads * head_dim] over the projection
    k_norm: object = None
    use_rope: bool = True
    window: int = 0                  # > 0: a sliding-window layer (each query sees its last `window` positions)
    experts: object = None           # a MoE layer's router and experts (models/moe.py), in place of w_gate/up/down


class LlamaModel:
    def __init__(self, model_file, backend):
        self.config = cfg = model_file.config
        self.backend = backend
        t = model_file.tensors   # shapes already checked against the config by the loader
        embd = t["token_embd.weight"]
        self.token_embd = backend.prepare_embedding(embd)
        self.output_norm = backend.prepare_vector(t["output_norm.weight"])
        self.layer_norm = family(cfg.arch).norm == "layer"     # LayerNorms with biases, else RMSNorms
        self.output_norm_bias = backend.prepare_vector(t["output_norm.bias"]) if self.layer_norm else None
        head = t.get("output.weight") or embd
        self.output = backend.prepare_weight(head)
        self.layers = [self.load_layer(t, i) for i in range(cfg.n_layers)]
        self.freq_factors = freq_factors_for(cfg, t)
        self.scale = cfg.attention_scale or 1.0 / math.sqrt(cfg.head_dim)
        self.rope_mscale = longrope_attention_factor(cfg)   # multiplies the rotated dims of q and of k
        self.embedding_scale = cfg.embedding_scale

    def load_layer(self, t, i):
        b, p = self.backend, f"blk.{i}."

        def vector(name):
            return b.prepare_vector(t[p + name]) if p + name in t else None

        def matrix(name):       # absent: the FFN of a MoE layer (models/moe.py)
            return b.prepare_weight(t[p + name]) if p + name in t else None

        return LayerWeights(
            wq=b.prepare_weight(t[p + "attn_q.weight"]),
            wk=b.prepare_weight(t[p + "attn_k.weight"]),
            wv=b.prepare_weight(t[p + "attn_v.weight"]),
            wo=b.prepare_weight(t[p + "attn_output.weight"]),
            w_gate=matrix("ffn_gate.weight"),
            w_up=matrix("ffn_up.weight"),
            w_down=matrix("ffn_down.weight"),
            attn_norm=vector("attn_norm.weight"),
            ffn_norm=vector("ffn_norm.weight"),
            attn_norm_bias=vector("attn_norm.bias"),
            ffn_norm_bias=vector("ffn_norm.bias"),
            attn_post_norm=vector("post_attention_norm.weight"),
            ffn_post_norm=vector("post_ffw_norm.weight"),
            bq=vector("attn_q.bias"),
            bk=vector("attn_k.bias"),
            bv=vector("attn_v.bias"),
            q_norm=vector("attn_q_norm.weight"),
            k_norm=vector("attn_k_norm.weight"),
            use_rope=i not in self.config.nope_layers,
            window=self.config.layer_window(i),
        )

    def activation_bytes(self, n_tokens, n_rows):
        """The most activation memory one forward pass of n_tokens tokens with n_rows logits rows
        holds at once (the backend's activation dtype): what forward_device keeps alive, counted
        from its code. Throughout: the residual stream x, the norm scratch h and the last block
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

    def forward_greedy(self, batch, kv_cache):
        """(tokens, logprobs) of the logits rows, picked greedily by the backend (greedy_tokens):
        for steps whose rows are all plain greedy (engine.py), on a backend that samples itself."""
        b = self.backend
        return b.greedy_tokens(b.run_forward(self.forward_device, batch, kv_cache))

    def forward_device(self, batch, kv_cache):
        """The forward pass over a batch already on the backend (prepare_batch's); logits stay there."""
        b = self.backend
        normed = self.final_hidden(batch, kv_cache)                                   # [rows, d]
        logits = b.matmul(normed, self.output, b.empty((len(normed), self.config.vocab_size)))
        if self.config.logit_scale != 1.0:
            b.scale(logits, 1.0 / self.config.logit_scale)
        if self.config.final_softcap:
            b.softcap(logits, self.config.final_softcap)
        return logits

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
        if self.embedding_scale != 1.0:
            b.scale(x, self.embedding_scale)
        h = b.empty((n, cfg.hidden_size))                                             # [n, d] scratch
        branch = None       # the last block's output, added to x with the norm after it (one launch on cuda)
        for i, layer in enumerate(self.layers):
            attn_in = self.block_input(x, branch, layer.attn_norm, layer.attn_norm_bias, h)
            branch = self.block_output(self.attention(layer, attn_in, batch, *kv_cache.layer(i)), layer.attn_post_norm)
            mlp_in = self.block_input(x, branch, layer.ffn_norm, layer.ffn_norm_bias, h)
            branch = self.block_output(self.mlp(layer, mlp_in), layer.ffn_post_norm)
        b.add_inplace(x, branch)
        rows = x[batch.logits_rows] if len(batch.logits_rows) != n else x
        return self.norm(rows, self.output_norm, self.output_norm_bias, b.empty(rows.shape))   # [rows, d]

    def norm(self, x, weight, bias, out):
        """out = the family's layer norm of x: LayerNorm (with its bias) or RMSNorm."""
        if self.layer_norm:
            return self.backend.layernorm(x, weight, bias, self.config.rms_eps, out)
        return self.backend.rmsnorm(x, weight, self.config.rms_eps, out)

    def block_input(self, x, branch, pre_norm, pre_norm_bias, out):
        """Adds the previous block's output to the residual stream x; returns the next block's
        input: x normed into out, or x itself where the family has no pre-norm."""
        b, eps = self.backend, self.config.rms_eps
        if pre_norm is None:
            if branch is not None:
                b.add_inplace(x, branch)
            return x
        if branch is None:
            return self.norm(x, pre_norm, pre_norm_bias, out)
        if self.layer_norm:
            return b.add_layernorm(x, branch, pre_norm, pre_norm_bias, eps, out)
        return b.add_rmsnorm(x, branch, pre_norm, eps, out)

    def block_output(self, y, post_norm):
        """A block's output as the residual stream takes it: post-normed, scaled (in place)."""
        if post_norm is not None:
            self.backend.rmsnorm(y, post_norm, self.config.rms_eps, y)
        if self.config.residual_scale != 1.0:
            self.backend.scale(y, self.config.residual_scale)
        return y

    def attention(self, layer, h, batch, k_cache, v_cache):
        cfg, b = self.config, self.backend
        n, hd = batch.n_tokens, cfg.head_dim
        q = self.project(h, layer.wq, layer.bq)                                 # [n, H * hd]
        k = self.project(h, layer.wk, layer.bk)                                 # [n, KV * hd]
        v = self.project(h, layer.wv, layer.bv).reshape(n, cfg.n_kv_heads, hd)  # [n, KV, hd]
        if layer.q_norm is not None:
            self.qk_norm(q, layer.q_norm)
            self.qk_norm(k, layer.k_norm)
        q, k = q.reshape(n, cfg.n_heads, hd), k.reshape(n, cfg.n_kv_heads, hd)  # [n, H, hd], [n, KV, hd]
        if layer.use_rope:
            theta, freq_factors = self.rope_of(layer)
            b.rope(q, batch.positions, cfg.n_rot, theta, cfg.rope_neox, freq_factors, self.rope_mscale)
            b.rope(k, batch.positions, cfg.n_rot, theta, cfg.rope_neox, freq_factors, self.rope_mscale)
        b.kv_store(k, v, k_cache, v_cache, batch.slot_mapping)
        attn = b.attention(q, k_cache, v_cache, batch, self.scale, b.empty(q.shape),
                           layer.window, cfg.attn_softcap)                               # [n, H, hd]
        return b.matmul(attn.reshape(n, -1), layer.wo, b.empty((n, cfg.hidden_size)))

    def rope_of(self, layer):
        """(theta, freq factors) of a layer's rope: Gemma 3's sliding layers have a base of their own, unscaled."""
        if layer.window and self.config.rope_theta_local is not None:
            return self.config.rope_theta_local, None
        return self.config.rope_theta, self.freq_factors

    def qk_norm(self, x, weight):
        """RMSNorm of q or k [n, heads * hd] in place: per head or over the whole row, as long as the weight."""
        rows = x.reshape(-1, weight.shape[0])
        self.backend.rmsnorm(rows, weight, self.config.rms_eps, rows)

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

