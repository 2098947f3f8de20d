"""Top-k expert routing of a mixture-of-experts layer, on the host (both backends).

transformers' rule for Mixtral and Qwen3-MoE: softmax over every expert's router
logit, the k largest probabilities, renormalised to sum to 1 where the model
asks (Mixtral always; Qwen3-MoE with norm_topk_prob). Computed in float64 from
float32 logits; ids in descending order of weight.
"""
import numpy as np


def route_top_k(logits, k, normalize):
    """(ids int32 [n, k], weights float32 [n, k]) of router logits [n, n_experts]."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or not 0 < k <= logits.shape[1]:
        raise ValueError(f"cannot pick {k} experts from router logits of shape {logits.shape}")
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = np.take_along_axis(shifted, ids, axis=1) / shifted.sum(axis=1, keepdims=True)
    if normalize:
        probs /= probs.sum(axis=1, keepdims=True)
    return ids.astype(np.int32), probs.astype(np.float32)
