"""Tensor storage types, numbered as GGUF numbers them (ggml_type).

One table: block size (weights per block) and bytes per block. The C side
declares the same layouts in native/quants.h with size asserts.
"""
from enum import IntEnum


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q8_0 = 8
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


# type -> (weights per block, bytes per block)
BLOCK_LAYOUT = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210),
}


def row_bytes(ggml_type, n_cols):
    """Bytes of one row of n_cols weights; n_cols must be a whole number of blocks."""
    block, size = BLOCK_LAYOUT[GGMLType(ggml_type)]
    if n_cols % block:
        raise ValueError(f"{GGMLType(ggml_type).name} rows need a multiple of {block} columns, got {n_cols}")
    return n_cols // block * size


def tensor_bytes(ggml_type, shape):
    """Bytes of a tensor whose last (fastest) dimension is shape[-1]."""
    n_rows = 1
    for d in shape[:-1]:
        n_rows *= d
    return n_rows * row_bytes(ggml_type, shape[-1])
