"""Mixture-of-experts decoders (Mixtral, Qwen3-MoE): LlamaModel's attention and norms, with
routed experts in place of the dense FFN in config.moe_layers (Qwen3-MoE may keep dense
layers: config.dense_layers).

Each MoE layer routes every token to its top n_experts_used experts (softmax over the
router logits; the k weights renormalised where config.norm_topk_prob) and sums their
silu-gated FFNs with those weights: backend.moe_route then backend.moe_ffn, which
groups the tokens by expert so each expert's weights are read once per step.
"""
from dataclasses import replace

from pyforge.models.llama import LlamaModel


class MoeModel(LlamaModel):
    def __init__(self, model_file, backend):
        self.routing_log = None     # a list to record each MoE layer's expert ids [n, k] (host) into; tests
        super().__init__(model_file, backend)

    def load_layer(self, t, i):
        layer = super().load_layer(t, i)
        if i not in self.config.moe_layers:
            return layer
        p, n = f"blk.{i}.", self.config.n_experts
        experts = [[t[f"{p}{stem}.{e}.weight"] for e in range(n)] for stem in ("ffn_gate", "ffn_up", "ffn_down")]
        return replace(layer, experts=self.backend.prepare_experts(t[p + "ffn_gate_inp.weight"], *experts))

    def activation_bytes(self, n_tokens, n_rows):
        """LlamaModel's count, or more where the experts' buffers exceed the dense MLP's: per token,
        the output, and per pick a gathered row, gate, up and the expert's output."""
        cfg, e = self.config, self.backend.activation_dtype_bytes
        moe = n_tokens * (cfg.hidden_size + cfg.n_experts_used * (2 * cfg.hidden_size + 2 * cfg.expert_ffn_size)) * e
        return super().activation_bytes(n_tokens, n_rows) + moe

    def mlp(self, layer, h):
        if layer.experts is None:
            return super().mlp(layer, h)
        b, cfg = self.backend, self.config
        ids, weights = b.moe_route(h, layer.experts, cfg.n_experts_used, cfg.norm_topk_prob)   # [n, k] each
        if self.routing_log is not None:
            self.routing_log.append(ids)
        return b.moe_ffn(h, ids, weights, layer.experts, b.empty((h.shape[0], cfg.hidden_size)))   # [n, d]
