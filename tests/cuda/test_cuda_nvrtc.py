"""Every CUDA kernel module compiles with NVRTC as CuPy compiles it (no GPU needed).

The text the backend hands CuPy (kernel_source) with its options plus CuPy's
own, for sm_80 and sm_90; a warning fails too. NVRTC has no C/C++ standard
headers, so a source that nvcc accepts can still fail here. Skipped where
NVRTC or the CUDA headers are missing (pip install '.[nvrtc-check]'), unless
PYFORGE_REQUIRE_NVRTC=1 (CI), which makes that a failure.
"""
import os

import pytest

from build_tools import nvrtc_check
from pyforge.backends.cuda_kernels import KERNELS


@pytest.fixture(scope="module")
def toolchain():
    found, why = nvrtc_check.find_toolchain()
    if found is None:
        if os.environ.get("PYFORGE_REQUIRE_NVRTC") == "1":
            pytest.fail(f"NVRTC is required (PYFORGE_REQUIRE_NVRTC=1): {why}")
        pytest.skip(why)
    return found


@pytest.mark.parametrize("arch", nvrtc_check.ARCHS)
@pytest.mark.parametrize("module", KERNELS)
def test_compiles_as_cupy_does(toolchain, module, arch):
    result = nvrtc_check.compile_module(module, arch, *toolchain)
    assert result.ok, result.log


def test_a_standard_header_fails(toolchain):
    """What nvcc would accept and CuPy would not: the check must see the difference."""
    nvrtc, include = toolchain
    ok, log = nvrtc.compile('#include <stdint.h>\nextern "C" __global__ void k(int *x) { *x = 1; }\n', "k.cu",
                            nvrtc_check.cupy_options("sm_90", include))
    assert not ok and "stdint.h" in log
