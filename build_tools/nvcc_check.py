"""Compile every cuda/*.cu with nvcc, as a check that the kernel sources build.

The kernels are compiled for real at run time by CuPy (NVRTC, which
nvrtc_check.py runs as CuPy does); this is the nvcc guard, usable without a GPU:

    python build_tools/nvcc_check.py            # every file, sm_80 and sm_90
    python build_tools/nvcc_check.py cuda/quant.cu --arch sm_90

Each (file, arch) becomes PTX in a temporary directory (`nvcc --ptx`,
warnings as errors); the result lists the extern "C" kernels found in it.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parent.parent / "cuda"
ARCHS = ("sm_80", "sm_90")
_ENTRY = re.compile(r"^\s*\.(?:visible|weak)\s+\.entry\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(", re.M)


@dataclass
class CheckResult:
    source: Path
    arch: str
    ok: bool
    seconds: float
    kernels: list = field(default_factory=list)  # extern "C" entry points in the PTX
    log: str = ""  # nvcc's stdout + stderr


def find_nvcc():
    """Path of nvcc: on PATH, else under $CUDA_HOME / $CUDA_PATH; None if absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def sources():
    """Every kernel source, sorted."""
    return sorted(CUDA_DIR.glob("*.cu"))


def kernel_names(ptx):
    """Names of the kernels (entry points) defined in PTX text."""
    return _ENTRY.findall(ptx)


def compile_ptx(source, arch, nvcc=None, out_dir=None):
    """nvcc --ptx -arch=<arch> on one source; a CheckResult, never raises on a compile error."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH or under CUDA_HOME / CUDA_PATH")
    source = Path(source)
    with tempfile.TemporaryDirectory(prefix="pyforge-nvcc-") as tmp:
        out = Path(out_dir or tmp) / f"{source.stem}.{arch}.ptx"
        cmd = [nvcc, "--ptx", f"-arch={arch}", "-std=c++17", "-I", str(CUDA_DIR),
               "-Werror", "all-warnings", "-o", str(out), str(source)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        ok = proc.returncode == 0 and out.is_file()
        kernels = kernel_names(out.read_text()) if ok else []
    log = " ".join(cmd) + "\n" + proc.stdout + proc.stderr
    return CheckResult(source, arch, ok, seconds, kernels, log)


def check_all(files=None, archs=ARCHS, nvcc=None):
    """compile_ptx for every (file, arch); a list of CheckResult."""
    return [compile_ptx(f, a, nvcc) for f in (files or sources()) for a in archs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="sources (default: every cuda/*.cu)")
    ap.add_argument("--arch", action="append", help="sm_XX (repeatable; default sm_80 and sm_90)")
    args = ap.parse_args(argv)
    if find_nvcc() is None:
        print("nvcc not found", file=sys.stderr)
        return 2
    results = check_all([Path(f) for f in args.files] or None, tuple(args.arch or ARCHS))
    return report(results, lambda r: f"{r.source.name:<16} {r.arch}  {r.seconds:5.1f}s  {len(r.kernels)} kernels")


def report(results, describe):
    """A line per result (ok / FAIL, then describe(result)), the log of each failure; the exit status."""
    for r in results:
        print(f"{'ok  ' if r.ok else 'FAIL'} {describe(r)}")
        if not r.ok:
            print(r.log)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
