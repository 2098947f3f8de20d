"""Compile every CUDA kernel module with NVRTC, as CuPy compiles it at run time.

nvcc_check.py compiles the .cu files with nvcc, which has the host's C/C++
headers and its own warnings; what the backend really runs is CuPy handing
NVRTC the text of `kernel_source(module)` with `compile_options()`, plus the
options CuPy adds itself, and the CUDA runtime headers (cuda_fp16.h) on the
include path. This check does exactly that, without a GPU:

    python -m build_tools.nvrtc_check           # every module, sm_80 and sm_90

NVRTC and the headers are found as CuPy 14 finds them, through
cuda.pathfinder (the NVIDIA wheels `cuda-toolkit[nvrtc,cudart]`, conda, or
CUDA_HOME / CUDA_PATH). Any warning in NVRTC's log counts as a failure.
"""
import argparse
import ctypes
import sys
import time
from dataclasses import dataclass

from build_tools.nvcc_check import ARCHS, report
from pyforge.backends.cuda_kernels import KERNELS, compile_options, kernel_source

# What CuPy 14.2 adds to a RawModule's options (cupy/cuda/compiler.py:
# _compile_with_cache_cuda and _compile_using_nvrtc_no_warning), besides -arch.
# It also adds --pch (NVRTC >= 12.8), left out here: precompiled headers only
# speed compiling up, and NVRTC logs their bookkeeping as warnings.
CUPY_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


@dataclass
class CheckResult:
    module: str
    arch: str
    ok: bool
    seconds: float
    log: str        # the options, then NVRTC's log


class Nvrtc:
    """The few NVRTC calls a compile check needs, through ctypes."""

    def __init__(self, path):
        self.path = path
        self.lib = ctypes.CDLL(path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        self.version = (major.value, minor.value)

    def _check(self, status):
        if status != 0:
            raise RuntimeError(self.lib.nvrtcGetErrorString(status).decode())

    def compile(self, source, name, options):
        """(succeeded, log) of compiling source to a binary with options."""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None))
        try:
            opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            status = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)))
            log = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(prog, log))
            return status == 0, log.value.decode(errors="replace")
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def find_toolchain():
    """(Nvrtc, CUDA include dir) as CuPy would find them, or (None, why not)."""
    try:
        from cuda import pathfinder
    except ImportError:
        return None, "cuda-pathfinder is not installed (pip install '.[nvrtc-check]')"
    try:
        nvrtc = Nvrtc(pathfinder.load_nvidia_dynamic_lib("nvrtc").abs_path)
    except Exception as e:      # DynamicLibNotFoundError and friends
        return None, f"NVRTC not found ({type(e).__name__}: {e})"
    include = pathfinder.find_nvidia_header_directory("cudart")
    if include is None:
        return None, "the CUDA runtime headers (cuda_fp16.h) were not found"
    return (nvrtc, include), ""


def cupy_options(arch, include):
    """The option list CuPy passes NVRTC for one of our RawModules on a device of arch."""
    return (*compile_options(), *CUPY_OPTIONS, f"-arch={arch}", "-I" + include)


def compile_module(module, arch, nvrtc, include):
    options = cupy_options(arch, include)
    t0 = time.perf_counter()
    ok, log = nvrtc.compile(kernel_source(module), f"{module}.cu", options)
    seconds = time.perf_counter() - t0
    ok = ok and "warning" not in log
    return CheckResult(module, arch, ok, seconds, " ".join(options) + "\n" + log)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", help="sm_XX (repeatable; default sm_80 and sm_90)")
    args = ap.parse_args(argv)
    toolchain, why = find_toolchain()
    if toolchain is None:
        print(why, file=sys.stderr)
        return 2
    nvrtc, include = toolchain
    print(f"NVRTC {nvrtc.version[0]}.{nvrtc.version[1]} ({nvrtc.path}), headers {include}")
    results = [compile_module(m, a, nvrtc, include) for m in KERNELS for a in (args.arch or ARCHS)]
    return report(results, lambda r: f"{r.module:<10} {r.arch}  {r.seconds:5.1f}s")


if __name__ == "__main__":
    sys.exit(main())
