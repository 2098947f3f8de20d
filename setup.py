"""Build the native core: Cython modules over C kernels, OpenMP, AVX2 when present."""
import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "build_tools"))
from cpu_features import compile_flags  # noqa: E402

CFLAGS = ["-O3", "-fopenmp", "-std=c11", "-fno-math-errno", *compile_flags()]
LDFLAGS = ["-fopenmp"]

# module name -> C sources it links besides its .pyx
NATIVE_MODULES = {
    "quant": ["native/quants.c", "native/matmul.c", "native/matmul_amx.c", "native/matmul_vnni.c",
              "native/matmul_x16.c", "native/matmul_x16_avx2.c", "native/moe_kernels.c"],
    "ops": ["native/ops_kernels.c", "native/kv_dtypes.c"],
    "sampler": ["native/sampler_kernels.c"],
    "ipc": ["native/shm_ring.c"],
    "block_pool": [],
    "ngram_index": [],
    "step_core": [],
}


def extension(name, c_sources):
    return Extension(
        f"pyforge.native.{name}",
        sources=[f"native/{name}.pyx", *c_sources],
        include_dirs=["native", np.get_include()],
        extra_compile_args=CFLAGS,
        extra_link_args=LDFLAGS,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )


# PYFORGE_ONLY=quant,ops builds a subset (handy while working on one module).
_only = [m for m in os.environ.get("PYFORGE_ONLY", "").split(",") if m]
_selected = {n: s for n, s in NATIVE_MODULES.items() if not _only or n in _only}

# cuda/ ships inside the package as pyforge/cuda_sources, so an installed (non-editable)
# pyforge finds its kernel sources; a checkout reads cuda/ itself. server/static/ (the
# playground page's files) is package data.
setup(
    packages=find_packages(include=["pyforge*"]) + ["pyforge.cuda_sources"],
    package_dir={"pyforge.cuda_sources": "cuda"},
    package_data={"pyforge.cuda_sources": ["*.cu", "*.cuh"], "pyforge.server": ["static/*"]},
    ext_modules=cythonize(
        [extension(n, s) for n, s in _selected.items()],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    ),
)
