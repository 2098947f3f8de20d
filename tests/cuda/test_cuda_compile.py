"""Every CUDA kernel source compiles with nvcc for sm_80 and sm_90 (no GPU needed).

Skipped where nvcc is missing, unless PYFORGE_REQUIRE_NVCC=1 (then it fails,
so a CI image without the toolkit cannot pass as green).
"""
import os

import pytest

from build_tools import nvcc_check

# The extern "C" kernels each file must define: the names the CUDA backend loads.
EXPECTED_KERNELS = {
    "quant.cu": {"dequant_q8_0_f16", "dequant_q4_K_f16", "dequant_q6_K_f16",
                 "matvec_q8_0_f16", "matvec_q4_K_f16", "matvec_q6_K_f16", "matvec_f16_f16"},
    "norm_rope.cu": {f"{k}_{t}" for k in ("rmsnorm", "add_rmsnorm", "layernorm", "add_layernorm", "rope", "silu_mul", "gelu_tanh_mul", "softcap",
                                          "scale", "add_inplace", "add_bias")
                     for t in ("f32", "f16")},
    "attention.cu": {"paged_attention_prefill", "paged_attention_decode", "paged_attention_decode_reduce",
                     "kv_store_f16", "paged_attention_prefill_fp8", "paged_attention_decode_fp8", "kv_store_fp8"},
    "sampling.cu": {"greedy_tokens_f32", "greedy_tokens_f16"},
}


@pytest.fixture(scope="module")
def nvcc():
    path = nvcc_check.find_nvcc()
    if path is None:
        if os.environ.get("PYFORGE_REQUIRE_NVCC") == "1":
            pytest.fail("nvcc is required (PYFORGE_REQUIRE_NVCC=1) but not on PATH or under CUDA_HOME")
        pytest.skip("nvcc not found on PATH or under CUDA_HOME / CUDA_PATH")
    return path


def test_every_source_is_checked():
    assert {p.name for p in nvcc_check.sources()} == set(EXPECTED_KERNELS)


@pytest.mark.parametrize("arch", nvcc_check.ARCHS)
@pytest.mark.parametrize("source", nvcc_check.sources(), ids=lambda p: p.name)
def test_compiles(nvcc, source, arch):
    result = nvcc_check.compile_ptx(source, arch, nvcc)
    assert result.ok, result.log
    assert set(result.kernels) == EXPECTED_KERNELS[source.name], result.kernels
