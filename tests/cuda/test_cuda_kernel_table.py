"""The CUDA backend's kernel table (pyforge/backends/cuda_kernels.py) matches the
parameter lists in cuda/*.cu, parameter by parameter (no GPU, no nvcc needed).

CuPy pushes each scalar argument with the width of its numpy type; a table entry
that says int where the kernel takes pf_i64 would shift every later argument."""
import re

import pytest

from pyforge.backends import cuda_kernels

_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)
_POINTEE = {"__half": "h", "float": "f", "int": "i", "pf_u8": "b"}  # pf_u8: fp8 KV bytes
_SCALAR = {"int": "I", "pf_i64": "Q", "float": "F"}


def param_letter(param):
    words = param.replace("*", " * ").replace("__restrict__", " ").replace("const", " ").split()
    if "*" in words:
        base = words[0]
        return _POINTEE.get(base, "b" if base.startswith("block_") else f"?{base}")
    return _SCALAR.get(words[0], f"?{words[0]}")


def source_signatures(module):
    text = (cuda_kernels.CUDA_DIR / f"{module}.cu").read_text()
    return {name: "".join(param_letter(p) for p in params.split(",")) for name, params in _KERNEL.findall(text)}


def test_param_letters():
    assert param_letter("const block_q4_K *__restrict__ w") == "b"
    assert param_letter("const __half *__restrict__ x") == "h"
    assert param_letter("pf_i64 n_blocks") == "Q"
    assert param_letter("const float *freq_factors") == "f"
    assert param_letter("float eps") == "F"


@pytest.mark.parametrize("module", sorted(cuda_kernels.KERNELS))
def test_table_matches_sources(module):
    assert source_signatures(module) == cuda_kernels.KERNELS[module]


def test_every_source_is_in_the_table():
    assert {p.stem for p in cuda_kernels.CUDA_DIR.glob("*.cu")} == set(cuda_kernels.KERNELS)


def test_kernel_source_pastes_the_header():
    src = cuda_kernels.kernel_source("quant")
    assert '#include "common.cuh"' not in src and "struct block_q4_K" in src
