"""The routed-expert FFN (quant.moe_ffn: tokens grouped by expert, each picked expert's
weights read once) against a dense FFN of the same active size (one gate/up/down of
k x expert_ffn rows, what each token multiplies by in the MoE).

    python benchmarks/bench_moe.py [--experts 16] [--top-k 4] [--dim 1024] [--expert-ffn 1024]
                                   [--type Q4_K] [--tokens 1 8 64] [--threads 2] [--reps 5]

Weights are random floats quantized by pyforge; tokens are routed uniformly at random
(distinct experts per token). For one token both read the same bytes (k experts vs one
matrix k times as tall), so the times should agree and both sit near memory bandwidth;
for a batch the MoE reads every expert any token picked (reported), the dense FFN the
same k experts' worth, so the MoE's cost per token rises toward the total expert bytes
until every expert is hit. Reported: best ms over --reps, weight bytes read / time, with
the weights as stored and repacked 16 rows at a time (x16, as the CPU backend loads them
where x16 kernels run).
"""
import argparse
import time

import numpy as np

from pyforge.ggml_types import BLOCK_LAYOUT, GGMLType
from pyforge.native import quant
from pyforge.synthetic import quantize

from machine import cpu_description


def random_matrix(rng, rows, cols, ggml_type):
    return quantize((rng.standard_normal((rows, cols)) * 0.02).astype(np.float32), ggml_type)


def matrix_bytes(rows, cols, ggml_type):
    block, size = BLOCK_LAYOUT[ggml_type]
    return rows * cols // block * size


def best_ms(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def route(rng, n_tok, n_experts, k):
    ids = np.array([rng.permutation(n_experts)[:k] for _ in range(n_tok)], dtype=np.int32)
    weights = rng.uniform(0.1, 1.0, (n_tok, k)).astype(np.float32)
    return ids, weights / weights.sum(axis=1, keepdims=True)


def dense_ffn(x, gate, up, down, t, n_ff, threads, x16=False):
    """The dense FFN on stored matrices, or on matrices repacked by quant.repack_x16."""
    n, d = x.shape
    matmul = quant.matmul_x16 if x16 else quant.matmul
    g, u, out = np.empty((n, n_ff), np.float32), np.empty((n, n_ff), np.float32), np.empty((n, d), np.float32)
    matmul(x, gate, t, n_ff, g, threads)
    matmul(x, up, t, n_ff, u, threads)
    g *= u / (1 + np.exp(-g))        # silu(g) * u, in numpy: a small share next to the matmuls
    matmul(g, down, t, d, out, threads)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--expert-ffn", type=int, default=1024)
    p.add_argument("--type", default="Q4_K", choices=[t.name for t in (GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0,
                                                                         GGMLType.Q4_0, GGMLType.F16, GGMLType.F32)])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    t, d, f, n_exp, k = GGMLType[args.type], args.dim, args.expert_ffn, args.experts, args.top_k
    rng = np.random.default_rng(0)
    experts = [tuple((random_matrix(rng, r, c, t), int(t)) for r, c in ((f, d), (f, d), (d, f)))
               for _ in range(n_exp)]
    tables = {"stored": quant.ExpertTable(experts, f, d), "x16": quant.ExpertTable(experts, f, d, repack=[t])}
    shapes = ((k * f, d), (k * f, d), (d, k * f))
    dense = [random_matrix(rng, r, c, t) for r, c in shapes]
    dense_x16 = [quant.repack_x16(w, int(t), r, c) for w, (r, c) in zip(dense, shapes)]
    layouts = ["stored"] + (["x16"] if tables["x16"].n_repacked == 3 * n_exp and all(w is not None for w in dense_x16) else [])
    expert_bytes = 2 * matrix_bytes(f, d, t) + matrix_bytes(d, f, t)
    print(f"# {cpu_description()}, {args.threads} threads; {n_exp} experts, top-{k}, d={d}, expert ffn={f}, {t.name} "
          f"({expert_bytes / 2**20:.2f} MiB per expert); dense ffn={k * f} (the same active size); "
          f"weights {' and '.join(layouts)} (x16: repacked 16 rows at a time, as the CPU backend loads them)")
    print("| tokens | experts read | layout | MoE ms | dense ms | MoE GB/s | dense GB/s | MoE / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.tokens:
        x = rng.standard_normal((n, d)).astype(np.float32)
        ids, weights = route(rng, n, n_exp, k)
        out = np.empty((n, d), np.float32)
        hit = len(np.unique(ids))
        for layout in layouts:
            table, x16 = tables[layout], layout == "x16"
            moe = best_ms(lambda: quant.moe_ffn(x, ids, weights, table, out, args.threads), args.reps)
            dns = best_ms(lambda: dense_ffn(x, *(dense_x16 if x16 else dense), int(t), k * f, args.threads, x16),
                          args.reps)
            print(f"| {n} | {hit} | {layout} | {moe:.3f} | {dns:.3f} | {hit * expert_bytes / moe / 1e6:.2f} "
                  f"| {k * expert_bytes / dns / 1e6:.2f} | {moe / dns:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
