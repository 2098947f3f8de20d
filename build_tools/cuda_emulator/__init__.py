"""CUDA kernels from cuda/*.cu, run on the CPU: the kernel source as written.

    mod = RawModule(code=source, options=("-I" + cuda_dir,))   # as cupy.RawModule
    mod.get_function("rmsnorm_f32")((n_rows,), (256,), (x, w, out, np.int32(d), np.float32(eps)))

The source is compiled by the host C++ compiler with cuda_emulator.h forced in
(fibers for CUDA threads, real barriers and warp shuffles; see its comment)
and a cuda_fp16.h of its own; arrays are numpy arrays, used in place. So a
machine without a GPU runs the kernels' own code: indexing, launch layout,
reductions, shuffles and barriers. It is stricter than CuPy where CuPy is
silent: every argument is checked against the kernel's C parameter (a numpy
scalar of exactly the parameter's type, an array whose element type matches
the pointer's), and a shuffle with an exited lane or a deadlock fails the
launch with a message. It cannot show races, memory faults or speed.

Compiled modules are cached by the hash of their text in
$PYFORGE_CUDA_EMULATOR_CACHE (default ~/.cache/pyforge/cuda_emulator, or a
folder in /tmp where the home folder is not writable).
"""
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from build_tools import cpu_features

HERE = Path(__file__).resolve().parent
COMPILER_FLAGS = ("-std=gnu++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing",
                  "-Wno-unknown-pragmas")
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')
_QUALIFIERS = re.compile(r"\b(const|volatile|__restrict__|__restrict|restrict)\b")

# C scalar types -> numpy; pointers: element type -> numpy (None: any 1-byte element, e.g. GGUF blocks)
SCALARS = {"int": np.int32, "unsigned": np.uint32, "unsigned int": np.uint32, "float": np.float32,
           "double": np.float64, "pf_i64": np.int64, "long long": np.int64, "int64_t": np.int64,
           "unsigned long long": np.uint64, "uint64_t": np.uint64}
POINTEES = {"float": np.float32, "__half": np.float16, "int": np.int32, "double": np.float64,
            "unsigned": np.uint32, "unsigned int": np.uint32, "pf_i64": np.int64}
_CTYPES = {np.int32: ctypes.c_int32, np.uint32: ctypes.c_uint32, np.float32: ctypes.c_float,
           np.float64: ctypes.c_double, np.int64: ctypes.c_int64, np.uint64: ctypes.c_uint64}


class EmulatorError(RuntimeError):
    """A launch the GPU would have run wrongly or not at all (the message says which)."""


def compiler():
    """The host C++ compiler: $CXX, else g++ or c++ on PATH; None if there is none."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@dataclass(frozen=True)
class Param:
    name: str
    ctype: str          # the declared type, as written, e.g. "const __half *__restrict__"
    pointer: bool
    base: str           # the type without qualifiers and '*', e.g. "__half"


def parse_kernels(code):
    """{kernel name: [Param, ...]} of every extern "C" __global__ function in code."""
    kernels = {}
    for name, params in _KERNEL.findall(code):
        out = []
        for text in filter(None, (p.strip() for p in params.split(","))):
            m = re.match(r"(.*?)(\w+)\s*$", text, re.S)
            ctype = m.group(1).strip()
            base = " ".join(_QUALIFIERS.sub(" ", ctype).replace("*", " ").split())
            out.append(Param(m.group(2), ctype, "*" in ctype, base))
        kernels[name] = out
    return kernels


def _entries(kernels):
    """C++ appended to the source: one void(void **) entry per kernel and the launch function."""
    lines = []
    for i, (name, params) in enumerate(kernels.items()):
        args = ", ".join(f"*({p.ctype} *)a[{j}]" for j, p in enumerate(params))
        lines.append(f"static void pf_emu_entry_{i}(void **a) {{ (void)a; {name}({args}); }}")
    table = ", ".join(f'{{"{name}", pf_emu_entry_{i}}}' for i, name in enumerate(kernels))
    lines += [
        "static const struct { const char *name; void (*fn)(void **); } pf_emu_table[] = {" + table + "};",
        'extern "C" __attribute__((visibility("default"))) int pf_emu_launch(const char *name, const unsigned *grid,',
        "        const unsigned *block, void **args, char *error, int error_len) {",
        "    for (const auto &k : pf_emu_table)",
        "        if (!strcmp(k.name, name)) return pf_emu::launch(k.fn, grid, block, args, error, error_len);",
        '    snprintf(error, error_len, "no kernel %s", name);',
        "    return -1;",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _cache_dir():
    """$PYFORGE_CUDA_EMULATOR_CACHE, else ~/.cache/pyforge/cuda_emulator, else (no writable home) one in /tmp."""
    root = Path(os.environ.get("PYFORGE_CUDA_EMULATOR_CACHE") or Path.home() / ".cache" / "pyforge" / "cuda_emulator")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.gettempdir()) / f"pyforge-cuda-emulator-{os.getuid()}"
        root.mkdir(parents=True, exist_ok=True)
    return root


def _include_dirs(options):
    return [o[2:] for o in options if o.startswith("-I")]


def build(code, options=()):
    """Path of the shared library for code (compiled now unless cached). The cache key
    covers the headers in the -I folders too: an edit to common.cuh alone rebuilds."""
    cxx = compiler()
    if cxx is None:
        raise EmulatorError("no C++ compiler (g++ / c++ / $CXX) to build the CUDA emulator with")
    source = code + "\n" + _entries(parse_kernels(code))
    runtime = (HERE / "cuda_emulator.h").read_text() + (HERE / "cuda_fp16.h").read_text()
    includes = _include_dirs(options)
    flags = (*COMPILER_FLAGS, *cpu_features.compile_flags())   # F16C: half conversions in one instruction
    headers = [h.read_text() for d in includes for h in sorted(Path(d).glob("*.cuh")) + sorted(Path(d).glob("*.h"))]
    key = hashlib.sha256("\0".join([source, runtime, cxx, *flags, *includes, *headers]).encode())
    lib = _cache_dir() / f"{key.hexdigest()[:24]}.so"
    if lib.exists():
        return lib
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "module.cu.cpp"
        src.write_text(source)
        cmd = [cxx, *flags, "-I" + str(HERE), *("-I" + d for d in includes),
               "-include", str(HERE / "cuda_emulator.h"), str(src), "-o", str(Path(tmp) / "module.so")]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            raise EmulatorError(f"the host compiler rejected the kernel source:\n{result.stderr[-6000:]}")
        os.replace(Path(tmp) / "module.so", lib)   # atomic: a concurrent build of the same text is harmless
    return lib


class RawModule:
    """The part of cupy.RawModule the backend uses: code + options in, functions out."""

    def __init__(self, code, options=(), **_):
        self.kernels = parse_kernels(code)
        self._lib = ctypes.CDLL(str(build(code, tuple(options))))
        self._lib.pf_emu_launch.restype = ctypes.c_int
        self._lib.pf_emu_launch.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint),
                                            ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_void_p),
                                            ctypes.c_char_p, ctypes.c_int]

    def get_function(self, name):
        if name not in self.kernels:
            raise EmulatorError(f"no extern \"C\" kernel {name} in this module")
        return Function(self._lib, name, self.kernels[name])


class Function:
    def __init__(self, lib, name, params):
        self._lib, self.name, self.params = lib, name, params

    def __call__(self, grid, block, args, **_):
        if len(args) != len(self.params):
            raise EmulatorError(f"{self.name}: takes {len(self.params)} arguments, got {len(args)}")
        held = [self._marshal(p, a) for p, a in zip(self.params, args)]   # kept alive through the call
        argv = (ctypes.c_void_p * max(len(held), 1))(*(ctypes.addressof(h) for h in held))
        dims = [(ctypes.c_uint * 3)(*(tuple(d) + (1, 1, 1))[:3]) for d in (grid, block)]
        error = ctypes.create_string_buffer(1024)
        if self._lib.pf_emu_launch(self.name.encode(), dims[0], dims[1], argv, error, len(error)):
            raise EmulatorError(f"{self.name}: {error.value.decode()}")

    def _marshal(self, param, value):
        where = f"{self.name}: argument {param.name} ({param.ctype})"
        if param.pointer:
            if value is None or (isinstance(value, (np.integer, int)) and int(value) == 0):
                return ctypes.c_void_p(0)
            if not isinstance(value, np.ndarray):
                raise EmulatorError(f"{where}: want an array, got {type(value).__name__}")
            want = POINTEES.get(param.base)
            if (want is None and value.dtype.itemsize != 1) or (want is not None and value.dtype != want):
                raise EmulatorError(f"{where}: got an array of {value.dtype}")
            if not value.flags.c_contiguous:
                raise EmulatorError(f"{where}: the array is not C-contiguous")
            return ctypes.c_void_p(value.ctypes.data)
        want = SCALARS.get(param.base)
        if want is None:
            raise EmulatorError(f"{where}: the emulator does not know this scalar type")
        if not isinstance(value, np.generic) or value.dtype != want:
            got = value.dtype if isinstance(value, np.generic) else type(value).__name__
            raise EmulatorError(f"{where}: want numpy {np.dtype(want).name}, got {got} "
                                "(CuPy would pass its bytes as they are)")
        return _CTYPES[want](value.item())
