"""Stored tensors (GGUF / safetensors types) to float32 on the host, through the native
dequantizers: for small vectors at load, the CUDA backend's host-side conversions
and tests. A loader/quant concern, shared by every backend."""
import numpy as np

from pyforge.ggml_types import GGMLType
from pyforge.native import quant


def to_float32(tensor):
    """A loaded tensor (`.ggml_type`, `.shape`, `.data` as stored) as float32 of its shape."""
    n = int(np.prod(tensor.shape))
    if tensor.ggml_type == GGMLType.F32:
        return np.ascontiguousarray(tensor.data, dtype=np.float32).reshape(tensor.shape)
    return quant.dequantize(np.ascontiguousarray(tensor.data), int(tensor.ggml_type), n).reshape(tensor.shape)
