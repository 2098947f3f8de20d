"""Decide which instruction-set flags the native build uses.

The C kernels carry an AVX2/FMA/F16C path behind `#ifdef __AVX2__` and a
portable scalar path. We build the SIMD path when the build machine has those
features (read from /proc/cpuinfo), unless PYFORGE_NATIVE_ARCH=scalar forces
the portable build (useful to test the fallback, or to build for older CPUs).
"""
import os
import platform

SIMD_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
REQUIRED = {"avx2", "fma", "f16c"}


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_arch():
    """Return 'avx2' or 'scalar'."""
    forced = os.environ.get("PYFORGE_NATIVE_ARCH", "").lower()
    if forced in ("avx2", "scalar"):
        return forced
    if platform.machine() not in ("x86_64", "AMD64"):
        return "scalar"
    return "avx2" if REQUIRED <= cpu_flags() else "scalar"


def compile_flags():
    return SIMD_FLAGS if native_arch() == "avx2" else []
