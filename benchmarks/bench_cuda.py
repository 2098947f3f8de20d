"""CUDA decode and prefill throughput on synthetic Llama shapes, beside the roofline.

    python benchmarks/bench_cuda.py [--json bench.json] [--shapes 1B 8B] [--formats F16 Q4_K]

For each shape (1B: TinyLlama-1.1B; 8B: Llama-3-8B) and weight format (F16,
or Q4_K for every matrix):
  decode   tokens/s at batch 1, 4, 8, 16, 64, 256, every sequence at context 512
           (one new token per sequence per step)
  decode graph  the same for batches up to 8, each step a CUDA graph replay
           (--cuda-graphs; --no-graphs leaves these rows out)
  prefill  tokens/s of one pass over 4 sequences of 512 tokens
  bound    decode: batch x bandwidth / (matmul weight bytes + the batch's KV
           bytes), bandwidth measured by a device-to-device copy (read + write);
           prefill: the fp16 GEMM rate (cupy, 8192^3) / (2 x matmul weights)
  torch    plain PyTorch eager fp16 on the same shapes (benchmarks/torch_llama.py;
           F16 rows only), when torch sees CUDA; the column is empty otherwise
A time is the wall-clock median of model.forward (which ends by copying the
logits to the host) after two warm-up steps: an engine step less scheduling
and sampling. Weights are random and made on the GPU: pyforge.synthetic would
need minutes to write the 8B model's 16 GB.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))   # torch_llama, beside this file

from torch_llama import step_seconds, torch_rows  # noqa: E402

from pyforge.backends.cuda import CudaBackend, DeviceWeight  # noqa: E402
from pyforge.engine.model_runner import KVCache  # noqa: E402
from pyforge.ggml_types import BLOCK_LAYOUT, GGMLType, row_bytes  # noqa: E402
from pyforge.loader import TensorRef  # noqa: E402
from pyforge.loader.names import expected_shapes  # noqa: E402
from pyforge.models.batch import ForwardBatch  # noqa: E402
from pyforge.models.config import ModelConfig  # noqa: E402
from pyforge.models.llama import LlamaModel  # noqa: E402
from pyforge.synthetic import CONFIGS  # noqa: E402

SHAPES = {
    "1B": CONFIGS["tinyllama-1.1b"],
    "8B": ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      head_dim=128, ffn_size=14336, rms_eps=1e-5, rope_theta=500000.0, n_rot=128, rope_neox=False,
                      context_length=8192).validate(),
}
FORMATS = {"F16": GGMLType.F16, "Q4_K": GGMLType.Q4_K}
BATCHES = (1, 4, 8, 16, 64, 256)   # 4 and 8: where the fused matvec hands over to dequant + cuBLAS
CONTEXT = 512
PREFILL = (4, 512)      # sequences x tokens
BLOCK = 16


class RandomWeightBackend(CudaBackend):
    """Weights made on the device instead of read from a file (the TensorRefs carry no data)."""

    def upload(self, tensor):
        cp, t = self.cupy, GGMLType(tensor.ggml_type)
        if t == GGMLType.F16:
            data = (cp.random.standard_normal(tensor.shape, dtype=cp.float32) * 0.02).astype(cp.float16)
        else:
            data = random_q4_k(cp, tensor.shape)
        return DeviceWeight(t, tuple(tensor.shape), data)

    def prepare_vector(self, tensor):
        return self.cupy.ones(tensor.shape, dtype=self.cupy.float32)


def random_q4_k(cp, shape):
    """Random Q4_K blocks (uint8 [n_out, row bytes]) with small finite d and dmin (bytes 0..3)."""
    n_out, n_in = shape
    size = BLOCK_LAYOUT[GGMLType.Q4_K][1]
    raw = cp.random.randint(0, 256, size=(n_out * row_bytes(GGMLType.Q4_K, n_in) // size, size), dtype=cp.uint8)
    raw[:, 0:4] = cp.asarray(np.array([1e-4, 1e-4], np.float16).view(np.uint8))
    return raw.reshape(n_out, -1)


def build_model(backend, cfg, fmt):
    tensors = {name: TensorRef(name, FORMATS[fmt] if len(shape) == 2 else GGMLType.F32, shape, None)
               for name, shape in expected_shapes(cfg).items()}
    return LlamaModel(SimpleNamespace(config=cfg, tensors=tensors), backend)


def matmul_weights(model):
    """(bytes, weights) of the matrices a decode step reads: every layer's and the head."""
    ws = [model.output] + [getattr(layer, n) for layer in model.layers
                           for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
    return sum(w.data.nbytes for w in ws), sum(w.shape[0] * w.shape[1] for w in ws)


def paged_batch(cfg, lengths, starts, rng):
    """ForwardBatch of sequences s with lengths[s] new tokens from position starts[s]; sequence s
    owns blocks [s * per_seq, (s + 1) * per_seq) of the pool."""
    lengths, starts = np.asarray(lengths), np.asarray(starts)
    per_seq = -(-int((starts + lengths).max()) // BLOCK)
    tables = np.arange(len(lengths) * per_seq, dtype=np.int32).reshape(len(lengths), per_seq)
    seq_of = np.repeat(np.arange(len(lengths)), lengths)
    positions = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)]).astype(np.int32)
    qsl = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return ForwardBatch(
        token_ids=rng.integers(3, cfg.vocab_size, len(positions)).astype(np.int32), positions=positions,
        slot_mapping=(tables[seq_of, positions // BLOCK] * BLOCK + positions % BLOCK).astype(np.int32),
        block_tables=tables, context_lens=(starts + lengths).astype(np.int32), query_start_loc=qsl,
        logits_rows=(qsl[1:] - 1).astype(np.int32))


def bench_model(backend, cfg, fmt, batches, context, prefill, bandwidth, gemm_rate, graphs=False):
    """Rows of {phase, batch, tokens, step_ms, tok_s, bound_tok_s} for one model on one backend;
    graphs: also decode as CUDA graph replays ("decode graph") where the batch allows one."""
    rng = np.random.default_rng(0)
    model = build_model(backend, cfg, fmt)
    n_blocks = max(max(batches) * -(-(context + 1) // BLOCK), prefill[0] * -(-prefill[1] // BLOCK))
    kv = KVCache(backend, cfg, n_blocks, BLOCK)
    w_bytes, w_count = matmul_weights(model)
    kv_token = KVCache.bytes_per_token(cfg, backend.kv_dtype_bytes)

    def decode_row(phase, b):
        batch = paged_batch(cfg, [1] * b, [context] * b, rng)
        sec = step_seconds(lambda: model.forward(batch, kv))
        bound = b * bandwidth / (w_bytes + b * (context + 1) * kv_token)
        return dict(phase=phase, batch=b, tokens=b, step_ms=sec * 1e3, tok_s=b / sec, bound_tok_s=bound)

    rows = [decode_row("decode", b) for b in batches]
    if graphs:
        backend.use_cuda_graphs(context + 1, BLOCK)
        rows += [decode_row("decode graph", b) for b in batches if b <= backend.matvec_max_rows]
        backend.graphs = None
    n_seq, length = prefill
    batch = paged_batch(cfg, [length] * n_seq, [0] * n_seq, rng)
    sec = step_seconds(lambda: model.forward(batch, kv))
    rows.append(dict(phase="prefill", batch=n_seq, tokens=n_seq * length, step_ms=sec * 1e3,
                     tok_s=n_seq * length / sec, bound_tok_s=gemm_rate / (2 * w_count)))
    return rows, w_bytes


# -- device ceilings -----------------------------------------------------------
def event_seconds(cp, fn, repeats):
    fn()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / 1e3 / repeats


def measure_bandwidth(cp, nbytes=2 << 30):
    """Bytes read + written per second by a device-to-device copy."""
    a = cp.ones(nbytes, dtype=cp.uint8)
    b = cp.empty_like(a)
    sec = event_seconds(cp, lambda: cp.copyto(b, a), 10)
    return 2 * nbytes / sec


def measure_gemm(cp, n=8192):
    """fp16 GEMM FLOP/s through cupy.dot (cuBLAS, float accumulation) on random data."""
    a = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
    b = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
    c = cp.empty((n, n), dtype=cp.float16)
    return 2 * n ** 3 / event_seconds(cp, lambda: cp.dot(a, b, out=c), 5)


def torch_with_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


# -- report ------------------------------------------------------------------------
def print_table(report):
    print(f"\n{report['device']}: copy bandwidth {report['bandwidth_GBps']:.0f} GB/s, "
          f"fp16 GEMM {report['gemm_TFLOPs']:.0f} TFLOP/s")
    head = ("model", "fmt", "phase", "batch", "tok/step", "step ms", "tok/s", "bound", "% bound", "torch tok/s")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in report["rows"]:
        torch_col = f"{r['torch_tok_s']:.0f}" if r.get("torch_tok_s") else "-"
        print(f"| {r['model']} | {r['format']} | {r['phase']} | {r['batch']} | {r['tokens']} | {r['step_ms']:.2f} | "
              f"{r['tok_s']:.0f} | {r['bound_tok_s']:.0f} | {100 * r['tok_s'] / r['bound_tok_s']:.0f}% | "
              f"{torch_col} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--json", default="bench_cuda.json", help="where to write the results")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch column")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph decode rows")
    args = ap.parse_args(argv)
    import cupy as cp

    t0 = time.perf_counter()
    report = dict(device=cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), context=CONTEXT,
                  prefill=PREFILL, bandwidth_GBps=measure_bandwidth(cp) / 1e9, gemm_TFLOPs=measure_gemm(cp) / 1e12,
                  rows=[])
    torch = None if args.no_torch else torch_with_cuda()
    for shape in args.shapes:
        cfg = SHAPES[shape]
        for fmt in args.formats:
            backend = RandomWeightBackend(stream=True)
            rows, w_bytes = bench_model(backend, cfg, fmt, args.batches, CONTEXT, PREFILL,
                                        report["bandwidth_GBps"] * 1e9, report["gemm_TFLOPs"] * 1e12,
                                        graphs=not args.no_graphs)
            del backend
            cp.get_default_memory_pool().free_all_blocks()
            report["rows"] += [dict(model=shape, format=fmt, weight_GB=w_bytes / 1e9, **r) for r in rows]
            print(f"[{time.perf_counter() - t0:6.1f} s] {shape} {fmt}: "
                  + ", ".join(f"{r['phase']} x{r['batch']} {r['tok_s']:.0f} tok/s" for r in rows), flush=True)
        if torch is not None and "F16" in args.formats:
            ours = torch_rows(torch, cfg, args.batches, CONTEXT, *PREFILL)
            for r in report["rows"]:
                if r["model"] == shape and r["format"] == "F16":
                    phase = "prefill" if r["phase"] == "prefill" else "decode"
                    r["torch_tok_s"] = ours[(phase, r["batch"] if phase == "decode" else r["tokens"])]
            print(f"[{time.perf_counter() - t0:6.1f} s] {shape} torch done", flush=True)
    report["seconds"] = time.perf_counter() - t0
    print_table(report)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
