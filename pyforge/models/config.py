"""ModelConfig: the shape of a decoder-only model, whatever file it came from.

Built by the loaders (GGUF metadata or a Hugging Face config.json) and by the
synthetic model generator; validated once, frozen afterwards.
"""
import math
from dataclasses import dataclass

from pyforge.models.registry import family

# Sanity limits: far above any real model, low enough that a hostile file
# cannot make us size buffers from absurd numbers.
MAX_HIDDEN = 1 << 16
MAX_LAYERS = 512
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_FFN = 1 << 20
MAX_VOCAB = 1 << 20
MAX_CONTEXT = 1 << 24
MAX_EXPERTS = 1024
LONGROPE_LISTS = ("short_factor", "long_factor")     # per-frequency divisors of longrope (Phi-3)


@dataclass(frozen=True)
class ModelConfig:
    arch: str              # a family of models/registry.py: "llama" | "mistral" | "qwen2" | "gemma" | ...
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    rms_eps: float         # epsilon of the layer and final norms (RMSNorm, or LayerNorm: StableLM)
    rope_theta: float
    n_rot: int             # rotary dims per head (<= head_dim)
    rope_neox: bool        # True: rotate-half pairs (i, i + n_rot/2); False: interleaved pairs (2i, 2i+1)
    rope_scaling: dict | None = None   # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    context_length: int = 2048
    tie_embeddings: bool = False       # no output.weight: logits use token_embd
    attn_bias: bool = False            # q/k/v biases (Qwen2)
    attention_scale: float | None = None   # softmax scale of q.k; None: 1/sqrt(head_dim) (Granite, Gemma 2/3)
    embedding_scale: float = 1.0       # the embeddings are multiplied by it (Granite; Gemma: sqrt(hidden_size))
    residual_scale: float = 1.0        # each block's output is multiplied by it before the residual add (Granite)
    logit_scale: float = 1.0           # the logits are divided by it (Granite's logits_scaling)
    nope_layers: tuple = ()            # layers that skip rope (SmolLM3's NoPE layers)
    sliding_window: int = 0            # > 0: a query of a sliding layer sees only its last sliding_window positions
    sliding_layers: tuple = ()         # the layers with the window (Mistral: all; Gemma 2/3: every 2nd / 5 of 6)
    attn_softcap: float = 0.0          # > 0: attention scores soft-capped, cap * tanh(s / cap) (Gemma 2)
    final_softcap: float = 0.0         # > 0: logits soft-capped likewise (Gemma 2)
    rope_theta_local: float | None = None  # the sliding layers' rope base, unscaled (Gemma 3); None: rope_theta
    # Mixture of experts (models/moe.py): n_experts routed FFNs of expert_ffn_size, n_experts_used per token
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn_size: int = 0
    norm_topk_prob: bool = True        # the top-k routing weights renormalised to sum to 1
    dense_layers: tuple = ()           # layers with a dense FFN (ffn_size) instead of experts (Qwen3-MoE)

    @property
    def q_dim(self):
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_dim

    def layer_window(self, i):
        """The sliding window of layer i (0: it attends to the whole context)."""
        return self.sliding_window if i in self.sliding_layers else 0

    @property
    def moe_layers(self):
        """The layers whose FFN is routed experts."""
        return tuple(i for i in range(self.n_layers) if self.n_experts and i not in self.dense_layers)

    def validate(self):
        """Raise ValueError naming the first field that is out of range; return self."""
        family(self.arch)         # ValueError for an unknown one
        limits = {
            "hidden_size": MAX_HIDDEN, "n_layers": MAX_LAYERS, "n_heads": MAX_HEADS,
            "n_kv_heads": MAX_HEADS, "head_dim": MAX_HEAD_DIM, "ffn_size": MAX_FFN,
            "vocab_size": MAX_VOCAB, "context_length": MAX_CONTEXT, "n_rot": MAX_HEAD_DIM,
        }
        for name, limit in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
                raise ValueError(f"{name} must be an integer in 1..{limit}, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2 or self.n_rot % 2 or self.n_rot > self.head_dim:
            raise ValueError(f"rotary dims {self.n_rot} must be even and at most head_dim {self.head_dim} (even)")
        if self.q_dim > 4 * MAX_HIDDEN:
            raise ValueError(f"n_heads * head_dim = {self.q_dim} is too large")
        if not (isinstance(self.rms_eps, float) and 0 < self.rms_eps < 1):
            raise ValueError(f"rms_eps must be a float in (0, 1), got {self.rms_eps!r}")
        if not (isinstance(self.rope_theta, float) and math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a positive float, got {self.rope_theta!r}")
        self._validate_scales()
        self._validate_layer_options()
        if self.rope_scaling is not None:
            self._validate_rope_scaling()
        if self.n_experts:
            self._validate_experts()
        return self

    def _validate_scales(self):
        """The multipliers (Granite, Gemma), the soft caps and the local rope base."""
        def check(name, allow_zero=False, allow_none=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not (number and (value > 0 or allow_zero and value == 0)):
                kind = "non-negative" if allow_zero else "positive"
                raise ValueError(f"{name} must be a {kind} number, got {value!r}")

        for name in ("embedding_scale", "residual_scale", "logit_scale"):
            check(name)
        for name in ("attention_scale", "rope_theta_local"):
            check(name, allow_none=True)
        for name in ("attn_softcap", "final_softcap"):
            check(name, allow_zero=True)

    def _validate_layer_options(self):
        """NoPE layers and the sliding window with its layers."""
        def check_layers(name):
            layers = getattr(self, name)
            if not isinstance(layers, tuple) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layers for i in layers):
                raise ValueError(f"{name} must be a tuple of layer indices below {self.n_layers}, got {layers!r}")

        check_layers("nope_layers")
        check_layers("sliding_layers")
        w = self.sliding_window
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= MAX_CONTEXT:
            raise ValueError(f"sliding_window must be an integer in 0..{MAX_CONTEXT} (0: none), got {w!r}")
        if self.sliding_layers and not w:
            raise ValueError("sliding_layers are given but sliding_window is 0")

    def _validate_experts(self):
        for name, limit in (("n_experts", MAX_EXPERTS), ("n_experts_used", self.n_experts),
                            ("expert_ffn_size", MAX_FFN)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
                raise ValueError(f"{name} must be an integer in 1..{limit}, got {value!r}")
        if not isinstance(self.norm_topk_prob, bool):
            raise ValueError(f"norm_topk_prob must be a bool, got {self.norm_topk_prob!r}")
        if not isinstance(self.dense_layers, tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layers for i in self.dense_layers):
            raise ValueError(f"dense_layers must be a tuple of layer indices below {self.n_layers}, "
                             f"got {self.dense_layers!r}")

    def _validate_rope_scaling(self):
        s = self.rope_scaling
        if not isinstance(s, dict) or not isinstance(s.get("rope_type"), str):
            raise ValueError(f"rope_scaling must be a dict with a 'rope_type' string, got {s!r}")
        for key, value in s.items():
            if key == "rope_type":
                continue
            if key in LONGROPE_LISTS:
                self._validate_factor_list(key, value)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"rope_scaling[{key!r}] must be a positive number, got {value!r}")
        if s["rope_type"] == "linear" and "factor" not in s:
            raise ValueError("linear rope_scaling needs 'factor'")
        if s["rope_type"] == "llama3":
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in s:
                    raise ValueError(f"llama3 rope_scaling needs {key!r}")
            if s["high_freq_factor"] <= s["low_freq_factor"]:
                raise ValueError("llama3 rope_scaling needs high_freq_factor > low_freq_factor")
        if s["rope_type"] == "longrope" and "original_max_position_embeddings" not in s:
            raise ValueError("longrope rope_scaling needs 'original_max_position_embeddings'")

    def _validate_factor_list(self, key, value):
        if not isinstance(value, (list, tuple)) or len(value) != self.n_rot // 2 or not all(
                not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in value):
            raise ValueError(f"rope_scaling[{key!r}] must be a list of {self.n_rot // 2} positive numbers "
                             f"(n_rot / 2), got {str(value)[:80]}")
