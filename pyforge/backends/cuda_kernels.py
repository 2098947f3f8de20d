"""The kernels of cuda/*.cu as CuPy RawModules, and one typed launcher for them.

KERNELS is the contract with the sources: every extern "C" kernel the backend
calls and its parameters, one letter each, in order:

    pointers   h  __half *     f  float *     i  int *     b  quantized blocks, fp8 bytes (uint8)
    scalars    I  int          Q  pf_i64      F  float

tests/cuda/test_cuda_kernel_table.py parses the .cu files and checks this
table against them (no GPU needed), so an argument of the wrong width cannot
slip through: CuPy passes each scalar with the size of its numpy type, and a
kernel reading an int where 8 bytes were pushed reads garbage, silently.

Importing this module imports no CUDA; CudaKernels takes the cupy module.
"""
import os
from pathlib import Path

import numpy as np


def _default_cuda_dir():
    """The checkout's cuda/ when running from one, else the copy an installed wheel
    carries (pyforge/cuda_sources, see setup.py); PYFORGE_CUDA_DIR overrides both."""
    checkout = Path(__file__).resolve().parents[2] / "cuda"
    return checkout if (checkout / "common.cuh").is_file() else Path(__file__).resolve().parents[1] / "cuda_sources"


CUDA_DIR = Path(os.environ.get("PYFORGE_CUDA_DIR") or _default_cuda_dir())

KERNELS = {
    "quant": {
        "dequant_q8_0_f16": "bhQ", "dequant_q4_K_f16": "bhQ", "dequant_q6_K_f16": "bhQ",
        "matvec_q8_0_f16": "bhhIII", "matvec_q4_K_f16": "bhhIII", "matvec_q6_K_f16": "bhhIII",
        "matvec_f16_f16": "hhhIII",
    },
    "norm_rope": {
        **{f"rmsnorm_{t}": f"{p}f{p}IF" for t, p in (("f32", "f"), ("f16", "h"))},
        **{f"add_rmsnorm_{t}": f"{p}{p}f{p}IF" for t, p in (("f32", "f"), ("f16", "h"))},
        **{f"layernorm_{t}": f"{p}ff{p}IF" for t, p in (("f32", "f"), ("f16", "h"))},
        **{f"add_layernorm_{t}": f"{p}{p}ff{p}IF" for t, p in (("f32", "f"), ("f16", "h"))},
        **{f"rope_{t}": f"{p}iIIIFIfF" for t, p in (("f32", "f"), ("f16", "h"))},
        **{f"silu_mul_{t}": f"{p}{p}{p}Q" for t, p in (("f32", "f"), ("f16", "h"))},
        **{f"gelu_tanh_mul_{t}": f"{p}{p}{p}Q" for t, p in (("f32", "f"), ("f16", "h"))},
        **{f"softcap_{t}": f"{p}QF" for t, p in (("f32", "f"), ("f16", "h"))},
        **{f"add_inplace_{t}": f"{p}{p}Q" for t, p in (("f32", "f"), ("f16", "h"))},
        **{f"scale_{t}": f"{p}FQ" for t, p in (("f32", "f"), ("f16", "h"))},
        **{f"add_bias_{t}": f"{p}fQI" for t, p in (("f32", "f"), ("f16", "h"))},
    },
    "attention": {
        "paged_attention_prefill": "hhhiiih" + "IIIIIII" + "F" + "IF",
        "paged_attention_decode": "hhhiiiff" + "IIIIII" + "F" + "IF",
        "paged_attention_decode_reduce": "ffiih" + "IIII",
        "kv_store_f16": "hhhhiI",
        "paged_attention_prefill_fp8": "hbbiiih" + "IIIIIII" + "F" + "IF" + "ff",
        "paged_attention_decode_fp8": "hbbiiiff" + "IIIIII" + "F" + "IF" + "ff",
        "kv_store_fp8": "hhbbiff" + "II",
    },
    "sampling": {"greedy_tokens_f32": "fIif", "greedy_tokens_f16": "hIif"},
}

MAX_HEAD_DIM = 256      # attention.cu: a lane holds head_dim / 32 <= 8 dims
MATVEC_ROWS = 8         # quant.cu MV_ROWS: activation rows one matvec warp multiplies per weight read

POINTER_DTYPES = {"h": np.float16, "f": np.float32, "i": np.int32, "b": np.uint8}
SCALAR_TYPES = {"I": np.int32, "Q": np.int64, "F": np.float32}
NULL = np.uint64(0)     # a NULL pointer argument (8 bytes, as a pointer is)


def cdiv(a, b):
    return -(-a // b)


def head_dim_problem(head_dim):
    """Why the CUDA attention kernels cannot run this head size, or None when they can."""
    if head_dim % 32 or head_dim > MAX_HEAD_DIM:
        return f"the CUDA attention kernels need head_dim a multiple of 32, at most {MAX_HEAD_DIM}; got {head_dim}"
    return None


def elementwise_grid(n, n_sm):
    """Blocks of 256 for n elements, at most 8 per SM: the kernels' grid-stride loops cover the rest."""
    return (min(cdiv(n, 256), 8 * n_sm),)


def kernel_source(module, cuda_dir=CUDA_DIR):
    """The module's source with common.cuh pasted in.

    CuPy caches compiled modules by the text it is given; an #include'd header
    is not part of that text, so an edit to common.cuh alone would run stale
    binaries. Pasting it in makes the header part of the cache key."""
    cuda_dir = Path(cuda_dir)
    header = (cuda_dir / "common.cuh").read_text()
    return (cuda_dir / f"{module}.cu").read_text().replace('#include "common.cuh"', header)


def compile_options(cuda_dir=CUDA_DIR):
    # CuPy adds -arch for the current device itself (sm_XX when NVRTC knows it).
    return ("-std=c++17", "-I" + str(cuda_dir))


def convert_args(name, signature, args):
    """args in launch order, scalars as the numpy type of the C parameter;
    array dtypes and contiguity checked (a mismatch would corrupt memory)."""
    if len(args) != len(signature):
        raise TypeError(f"{name}: takes {len(signature)} arguments, got {len(args)}")
    out = []
    for i, (kind, a) in enumerate(zip(signature, args)):
        if kind in SCALAR_TYPES:
            out.append(SCALAR_TYPES[kind](a))
        elif a is None:
            out.append(NULL)
        elif a.dtype != POINTER_DTYPES[kind] or not a.flags.c_contiguous:
            raise TypeError(f"{name}: argument {i} must be a C-contiguous {np.dtype(POINTER_DTYPES[kind]).name} "
                            f"array, got {a.dtype} {'contiguous' if a.flags.c_contiguous else 'strided'}")
        else:
            out.append(a)
    return tuple(out)


class CudaKernels:
    """Compiles the modules once (CuPy keeps the binaries in its disk cache)."""

    def __init__(self, cupy, cuda_dir=CUDA_DIR):
        if not (Path(cuda_dir) / "common.cuh").is_file():
            raise FileNotFoundError(f"CUDA kernel sources not found in {cuda_dir}: reinstall pyforge "
                                    "or set PYFORGE_CUDA_DIR to a checkout's cuda/ folder")
        self._functions = {}
        for module, signatures in KERNELS.items():
            mod = cupy.RawModule(code=kernel_source(module, cuda_dir), options=compile_options(cuda_dir))
            for name, signature in signatures.items():
                self._functions[name] = (mod.get_function(name), signature)

    def launch(self, name, grid, block, *args):
        if 0 in grid:       # an empty batch (e.g. no logits rows this step): CUDA rejects empty grids
            return
        function, signature = self._functions[name]
        function(tuple(grid), (block,), convert_args(name, signature, args))

    # -- launch layouts, as the comments in cuda/*.cu give them ---------------
    def dequant(self, qtype, src, dst, n_blocks):
        """dst half [n_blocks * block_size] = the weights of n_blocks blocks of src (qtype: q8_0, q4_K, q6_K)."""
        grid = (cdiv(n_blocks * 32, 256),) if qtype == "q8_0" else (n_blocks,)  # one thread per weight
        self.launch(f"dequant_{qtype}_f16", grid, 256, src, dst, n_blocks)

    def greedy_tokens(self, logits, tokens, logprobs):
        """tokens int32 [n], logprobs float32 [n] = each row's argmax and its raw logprob, as the
        host sampler's greedy rows (sampling.cu): one block per row of logits [n, vocab]."""
        t = "f16" if logits.dtype == np.float16 else "f32"
        self.launch(f"greedy_tokens_{t}", (logits.shape[0],), 256, logits, logits.shape[1], tokens, logprobs)

    def matvec(self, qtype, w, x, y, n_in, n_out):
        """y[n_x, n_out] = x[n_x, n_in] @ W^T (qtype q8_0, q4_K, q6_K or f16): one warp per output row
        and group of MATVEC_ROWS rows of x, 4 warps a block."""
        n_x = x.shape[0]
        self.launch(f"matvec_{qtype}_f16", (cdiv(n_out, 4), cdiv(n_x, MATVEC_ROWS)), 128, w, x, y, n_in, n_out, n_x)
