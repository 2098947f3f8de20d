"""The memory budget checked before any engine starts: several models whose
weights and KV pools do not fit the machine's available memory are refused with
a clear error, rather than left to swap (or be killed) under load.

For each model on the CPU (the KV pool lives in host memory):

    weights  = the model file's tensor bytes (mapped; read in as they are used), or
               the bytes --quantization makes of them (loader/quantize.py)
             + the repacked copies the CPU backend makes at load (matrices with an x16
               layout, quant.x16_layout, on hosts with x16 kernels and no AMX:
               backends/cpu.py), which replace a copy quantized at load (but Q5_K /
               Q6_K, kept for single tokens; experts of those types are not repacked)
    kv pool  = kv_pool_blocks(...) x block_size x bytes per token (K and V in
               --kv-cache-dtype: backends/kv_dtype.py)

against MemAvailable of /proc/meminfo. Models on a GPU keep weights and KV pool in
device memory, sized by gpu_memory_utilization there: they are not counted here.
"""
import importlib.util
import logging
import re
from typing import NamedTuple

from pyforge.engine.config import EngineConfig

log = logging.getLogger("pyforge.launcher")
GiB = 1 << 30
_EXPERT = re.compile(r"blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight$")     # an expert's matrix (loader/names.py)


class MemoryNeed(NamedTuple):
    model: str
    weights: int
    kv_pool: int

    @property
    def total(self):
        return self.weights + self.kv_pool


def check_memory(model_configs, available=None):
    """ValueError when the CPU models of model_configs (ServerConfig each) need more
    than `available` bytes (default: MemAvailable now)."""
    needs = [memory_need(c) for c in model_configs if _on_cpu(c.device)]
    if not needs:
        return
    available = available_memory() if available is None else available
    total = sum(n.total for n in needs)
    for n in needs:
        log.info("%s needs about %.2f GiB (weights %.2f GiB, KV pool %.2f GiB)",
                 n.model, n.total / GiB, n.weights / GiB, n.kv_pool / GiB)
    if total > available:
        parts = "; ".join(f"{n.model}: weights {n.weights / GiB:.2f} GiB + KV pool {n.kv_pool / GiB:.2f} GiB"
                          for n in needs)
        raise ValueError(f"the models need about {total / GiB:.2f} GiB of memory and {available / GiB:.2f} GiB "
                         f"is available ({parts}); serve fewer models, or give them smaller KV pools "
                         "(--kv-cache-tokens) or shorter contexts (--max-model-len)")


def memory_need(config):
    """MemoryNeed of one model's ServerConfig on the CPU backend."""
    from pyforge.backends import kv_dtype
    from pyforge.engine.model_runner import DEFAULT_KV_CACHE_BYTES, KVCache, kv_pool_blocks
    from pyforge.loader import load_model_file
    from pyforge.backends.cpu import repacks_weights
    from pyforge.loader.quantize import loaded_types

    ec = EngineConfig.from_server_config(config)
    repacks = repacks_weights()
    with load_model_file(config.model) as model_file:
        mc = model_file.config
        types = loaded_types(model_file, config.quantization)     # after --quantization
        weights = sum(_resident_bytes(t, types[name], repacks) for name, t in model_file.tensors.items())
        weight_type = kv_dtype.model_weight_type(model_file.tensors, types)    # what auto follows
    max_model_len = min(ec.max_model_len or mc.context_length, mc.context_length)
    value_bytes = kv_dtype.BYTES_PER_VALUE[kv_dtype.resolve(ec.kv_cache_dtype, "cpu", weight_type)]
    blocks = kv_pool_blocks(ec, mc, max_model_len, DEFAULT_KV_CACHE_BYTES, value_bytes)
    kv = blocks * ec.block_size * KVCache.bytes_per_token(mc, value_bytes)
    return MemoryNeed(config.served_model_name, weights, kv)


def _resident_bytes(tensor, loaded_type, repacks):
    """A weight's bytes once loaded: as mapped or as quantized at load, plus the repacked copy,
    which replaces one quantized at load unless the backend keeps that for single tokens. An
    expert matrix of a type kept for single tokens is not repacked at all (CpuBackend.prepare_experts)."""
    from pyforge.backends.cpu import single_token_originals
    from pyforge.ggml_types import tensor_bytes
    from pyforge.native import quant

    size = tensor_bytes(loaded_type, tensor.shape)
    if not (repacks and len(tensor.shape) == 2 and quant.x16_layout(loaded_type, *tensor.shape)):
        return size
    kept_for_one_token = loaded_type in single_token_originals()
    if kept_for_one_token and _EXPERT.match(tensor.name):
        return size
    replaced = loaded_type != tensor.ggml_type and not kept_for_one_token
    return size * (1 if replaced else 2)


def available_memory():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def _on_cpu(device):
    if device == "cpu":
        return True
    # auto without CuPy installed is the CPU; with it, the engine decides (the launcher
    # must not initialise CUDA before it forks the HTTP workers)
    return device == "auto" and importlib.util.find_spec("cupy") is None
