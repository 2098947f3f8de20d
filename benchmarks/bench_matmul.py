"""One quantized matmul at several batch sizes: every kernel family this CPU has (AVX2, AVX-512 VNNI, AMX).

    python benchmarks/bench_matmul.py [--threads 2] [--tokens 1 4 8 16 32 64 512] [--reps 15]
                                      [--shapes tinyllama|stories260k]

Weights are random floats quantized by pyforge (TinyLlama-1.1B's FFN and head
shapes; or stories260K's F32 ones, 64 wide, where a call's fixed cost and the
row dots' horizontal sums are what the x16 layout saves), in enough copies (--weight-mib in all) that each call reads its weights
from DRAM, as a model's layers do, not from the last call's cache; the same
activations go through `quant.matmul` once per family (AVX2; VNNI for K-quants;
AMX tiles from 9 tokens up) and through `quant.matmul_x16` over the weights
repacked 16 rows at a time (every x16 family here: AVX2 tiles, and VNNI ones on
VNNI CPUs), best of --reps. Reported: ms, GFLOP/s (2 x tokens x weights), and the weight
bytes / time (the decode roofline: a 1-token matmul cannot beat bandwidth).
"""
import argparse
import time

import numpy as np

from pyforge.ggml_types import GGMLType as T
from pyforge.native import quant

from machine import cpu_description

SHAPES = [  # (name, type, n_in, n_out)
    ("ffn_up 2048->5632", T.Q4_K, 2048, 5632),
    ("ffn_down 5632->2048", T.Q4_K, 5632, 2048),
    ("ffn_down 5632->2048", T.Q6_K, 5632, 2048),
    ("output 2048->32000", T.Q6_K, 2048, 32000),
    ("ffn_up 2048->5632", T.Q8_0, 2048, 5632),
    ("ffn_up 2048->5632", T.Q4_0, 2048, 5632),
    ("ffn_up 2048->5632", T.Q5_K, 2048, 5632),
]
STORIES_SHAPES = [
    ("attn_q 64->64", T.F32, 64, 64),
    ("ffn_up 64->172", T.F32, 64, 172),
    ("ffn_down 172->64", T.F32, 172, 64),
    ("output 64->512", T.F32, 64, 512),
]


def best_time(fn, copies, reps):
    """Best time of fn(weights) over reps calls, each on the next copy."""
    best = float("inf")
    for i in range(reps):
        w = copies[i % len(copies)]
        t0 = time.perf_counter()
        fn(w)
        best = min(best, time.perf_counter() - t0)
    return best


def kernel_families():
    """(name, matmul keywords) of every family this CPU runs, AVX2 first (the
    baseline); "x16 ...": the GEMM over weights repacked 16 rows at a time
    (keywords: {"kernels": family})."""
    families = [("AVX2", dict(amx=False, vnni=False))]
    if quant.x16_kernels() is not None:
        families.append(("x16 AVX2", {"kernels": "avx2"}))
    if quant.vnni_available():
        families += [("VNNI", dict(amx=False, vnni=True)), ("x16 VNNI", {"kernels": "vnni"})]
    if quant.amx_available():
        families.append(("AMX", dict(amx=True, vnni=True)))
    return families


def matmul_fn(family, x, t, n_out, out, threads):
    """fn(weights) for one family: the stored bytes, or for x16 the repacked ones."""
    if "kernels" in family:
        return lambda wc: quant.matmul_x16(x, wc, int(t), n_out, out, threads, **family)
    return lambda wc: quant.matmul(x, wc, int(t), n_out, out, threads, **family)


def bench_shape(name, t, n_in, n_out, tokens, threads, reps, weight_mib, families):
    rng = np.random.default_rng(0)
    w = quant.quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), int(t))
    n_copies = max(1, int(weight_mib * 2**20 // w.nbytes))
    stored = [w] + [w.copy() for _ in range(n_copies - 1)]
    packed = quant.repack_x16(w, int(t), n_out, n_in)      # None: no x16 layout for t, or no x16 kernels
    repacked = [packed] + [packed.copy() for _ in range(n_copies - 1)] if packed is not None else None
    rows = []
    for n_tok in tokens:
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        out = np.empty((n_tok, n_out), dtype=np.float32)
        times = []
        for _, kw in families:
            weights = repacked if "kernels" in kw else stored
            times.append(best_time(matmul_fn(kw, x, t, n_out, out, threads), weights, reps) if weights else float("nan"))
        rows.append((name, t.name, n_tok, times, 2.0 * n_tok * n_in * n_out, w.nbytes))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 8, 16, 32, 64, 512])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--weight-mib", type=float, default=640, help="weight copies in all (a 1.1B Q4_K_M model: ~640)")
    ap.add_argument("--shapes", choices=["tinyllama", "stories260k"], default="tinyllama")
    args = ap.parse_args()
    families = kernel_families()
    names = [n for n, _ in families]
    print(f"{cpu_description()}; kernel families here: {', '.join(names)}; {args.threads} threads; best of {args.reps}")
    print("| matmul | type | tokens | " + " | ".join(f"{n} ms" for n in names) + " | "
          + " | ".join(f"{n} GFLOP/s" for n in names) + " | best / AVX2 | best weight GB/s |")
    print("|---|---|---|" + "---|" * (2 * len(names) + 2))
    for shape in SHAPES if args.shapes == "tinyllama" else STORIES_SHAPES:
        for name, tname, n_tok, times, flops, wbytes in bench_shape(*shape, args.tokens, args.threads, args.reps,
                                                                    args.weight_mib, families):
            best = min(x for x in times if x == x)      # NaN: no such kernel for the type
            print(f"| {name} | {tname} | {n_tok} | " + " | ".join(f"{t * 1e3:.3g}" for t in times) + " | "
                  + " | ".join(f"{flops / t / 1e9:.0f}" for t in times)
                  + f" | {times[0] / best:.2f} | {wbytes / best / 1e9:.1f} |")


if __name__ == "__main__":
    main()
