"""The Gemma family (Gemma 1, 2, 3 text) over backend primitives.

Gemma's block is Llama's (models/llama.py) but for its MLP: GeGLU (gelu-tanh)
instead of SwiGLU. Its other traits are config fields and tensors that LlamaModel
already follows: RMSNorm by (1 + w), folded into the weights at load (loader/hf.py;
GGUF stores them so); embeddings times sqrt(hidden_size); a tied head; and in
Gemma 2 and 3 post-norms on each block's output (sandwich norms), sliding-window
layers and query_pre_attn_scalar as the attention scale. Gemma 2 soft-caps
attention scores and logits; Gemma 3 norms q and k per head before rope, and its
sliding layers use their own rope base, unscaled. The options are read in
gemma_options.py.
"""
import numpy as np

from pyforge.models.llama import LlamaModel


class GemmaModel(LlamaModel):
    def __init__(self, model_file, backend):
        super().__init__(model_file, backend)
        # transformers multiplies by sqrt(hidden) as a tensor of the activation dtype: rounded to it
        activation = np.dtype(f"f{backend.activation_dtype_bytes}").type
        self.embedding_scale = float(activation(self.config.embedding_scale))

    def mlp(self, layer, h):
        b, n = self.backend, h.shape[0]
        gate = b.matmul(h, layer.w_gate, b.empty((n, self.config.ffn_size)))  # [n, ffn]
        up = b.matmul(h, layer.w_up, b.empty((n, self.config.ffn_size)))      # [n, ffn]
        act = b.gelu_tanh_mul(gate, up, gate)
        return b.matmul(act, layer.w_down, b.empty((n, self.config.hidden_size)))
