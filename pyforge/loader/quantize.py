"""Runtime quantization (--quantization): float matmul weights to our block formats at load.

    with quantized_weights(model_file, "q4_k", backend):
        model = model_class(model_file, backend)

Inside the block the model file's F32 / F16 / BF16 matmul weights are TensorRefs
of quantized bytes (anonymous memory, made by the native quantizers on the
backend's threads when the model asks for each); on leaving it the file's own
views come back, and the mapped pages of the weights it quantized are dropped
from the resident set.
Kept as stored: the token embedding (also as a tied output head), norms,
biases, MoE routers and anything not 2-D or 3-D, and weights the file already
holds quantized (a log line says so).

Types follow llama.cpp's llama-quantize (src/llama-quant.cpp, llama_tensor_get_type):
  q8_0  every weight Q8_0.
  q4_0  Q4_0; the output head Q6_K (llama.cpp raises it for every type but Q8_0).
  q4_k  llama.cpp's Q4_K_M mix: Q4_K; Q6_K for the output head and for attn_v
        (attn_qkv when fused) and ffn_down in the layers use_more_bits picks: the
        first and last eighth of the layers and every third one between.
A row length that is not a whole number of blocks falls back to Q8_0 (llama.cpp:
Q5_0 for Q4_K, which we have no kernel for), or stays as stored when not a
multiple of 32 either.
"""
import logging
import os
import sys
import time
import weakref
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from pyforge.ggml_types import BLOCK_LAYOUT, GGMLType, tensor_bytes

QUANTIZATIONS = ("none", "q8_0", "q4_k", "q4_0")
# Other spellings users bring: llama.cpp's file types, mistral.rs's ISQ names.
SPELLINGS = {"q4_k_m": "q4_k", "q4k": "q4_k", "q8": "q8_0", "q80": "q8_0", "q40": "q4_0", "off": "none"}
BASE_TYPE = {"q8_0": GGMLType.Q8_0, "q4_k": GGMLType.Q4_K, "q4_0": GGMLType.Q4_0}
FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
# Weights whose name holds one of these stay as stored (llama.cpp's list, the parts we can meet).
KEPT_NAMES = ("token_embd.", "_norm.weight", "ffn_gate_inp.weight", "position_embd.", "token_types.")
MORE_BITS_NAMES = ("attn_v.weight", "attn_qkv.weight", "ffn_down")   # Q6_K in use_more_bits layers (q4_k)
CHUNK_BYTES = 16 << 20      # float32 rows converted and quantized per task: bounds the scratch memory

_log = logging.getLogger("pyforge.loader.quantize")


def parse_quantization(value):
    """The canonical name (one of QUANTIZATIONS) of a --quantization value; ValueError if unknown."""
    name = str(value).strip().lower()
    name = SPELLINGS.get(name, name)
    if name not in QUANTIZATIONS:
        raise ValueError(f"must be one of {', '.join(QUANTIZATIONS)}, got {value!r}")
    return name


def native_types(backend_name):
    """The quantized types a backend multiplies as stored (others it would widen to float)."""
    if backend_name == "cuda":
        from pyforge.backends.cuda import KEPT_QUANTIZED
        return frozenset(KEPT_QUANTIZED)
    return frozenset(t for t in GGMLType if t not in FLOAT_TYPES)     # the CPU's quant.matmul runs each


def use_more_bits(layer, n_layers):
    """llama.cpp's pick of the layers whose attn_v / ffn_down get more bits in *_K_M."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def is_matmul_weight(name, shape):
    """A weight llama-quantize would quantize: a 2-D or 3-D (experts) `*weight`, no table or norm."""
    return len(shape) in (2, 3) and name.endswith("weight") and not any(k in name for k in KEPT_NAMES)


def target_type(name, shape, quantization, n_layers):
    """The type a matmul weight gets under a quantization (llama.cpp's choice, then the fallback
    for row lengths that do not fill blocks), or None to keep it as stored."""
    want = BASE_TYPE[quantization]
    if name == "output.weight" and want != GGMLType.Q8_0:
        want = GGMLType.Q6_K
    elif quantization == "q4_k" and any(k in name for k in MORE_BITS_NAMES) and \
            use_more_bits(_layer(name), n_layers):
        want = GGMLType.Q6_K
    for t in (want, GGMLType.Q8_0):
        if shape[-1] % BLOCK_LAYOUT[t][0] == 0:
            return t
    return None


@dataclass(frozen=True)
class Step:
    name: str
    source: object          # the file's TensorRef (a float type)
    ggml_type: GGMLType     # what it becomes


def plan(model_file, quantization):
    """([Step] for the float weights to quantize, {name: TensorRef} of weights already quantized)."""
    if quantization == "none":
        return [], {}
    steps, stored = [], {}
    n_layers = model_file.config.n_layers
    for name, ref in model_file.tensors.items():
        if not is_matmul_weight(name, ref.shape):
            continue
        if ref.ggml_type not in FLOAT_TYPES:
            stored[name] = ref
            continue
        t = target_type(name, ref.shape, quantization, n_layers)
        if t is not None:
            steps.append(Step(name, ref, t))
    return steps, stored


def loaded_types(model_file, quantization):
    """{name: GGMLType} of every tensor of the model file as the model will get it."""
    new = {s.name: s.ggml_type for s in plan(model_file, parse_quantization(quantization))[0]}
    return {name: new.get(name, ref.ggml_type) for name, ref in model_file.tensors.items()}


def produced_types(quantization):
    """Every type target_type can give under a quantization."""
    base = BASE_TYPE[quantization]
    return {base, GGMLType.Q8_0} | ({GGMLType.Q6_K} if base != GGMLType.Q8_0 else set())


def check_backend(quantization, backend_name):
    """ValueError when the backend has no kernel for the quantization's types."""
    if quantization == "none":
        return
    native = native_types(backend_name)
    missing = [t.name for t in produced_types(quantization) if t not in native]
    if missing:
        usable = [q for q in QUANTIZATIONS[1:] if produced_types(q) <= native]
        raise ValueError(f"--quantization {quantization}: the {backend_name} backend has no kernel for "
                         f"{', '.join(missing)} weights (it would widen them to float again); "
                         f"use {' or '.join(usable)}")


@contextmanager
def quantized_weights(model_file, quantization, backend):
    """model_file.tensors with its float matmul weights quantized (see the module doc) for the
    duration of the block; the file's own views afterwards."""
    quantization = parse_quantization(quantization)
    check_backend(quantization, backend.name)
    steps, stored = plan(model_file, quantization)
    if stored:
        _log.info("--quantization %s: %d weight(s) already quantized in the file are kept as stored (%s)",
                  quantization, len(stored), _count_types(r.ggml_type for r in stored.values()))
    if not steps:
        yield model_file.tensors
        return
    original = model_file.tensors
    with ThreadPoolExecutor(max(1, backend.n_threads)) as pool:
        model_file.tensors = tensors = QuantizingTensors(original, steps, pool, quantization)
        try:
            yield tensors
        finally:
            model_file.tensors = original
            tensors.finish()


class QuantizingTensors(Mapping):
    """A model file's tensors, each planned weight quantized when it is asked for: a weight
    the backend does not keep (a VNNI repack replaces it) is freed before the next is made,
    so loading needs no room for a second quantized copy of the model."""

    def __init__(self, tensors, steps, pool, label):
        self._tensors, self._steps, self._pool, self.label = tensors, {s.name: s for s in steps}, pool, label
        self._alive = weakref.WeakValueDictionary()    # made and still held: asked for again, the same
        self.made = Counter()                          # GGMLType -> weights quantized
        self.bytes_in = self.bytes_out = 0
        self.seconds = 0.0
        self._progress = Progress(len(steps), f"quantizing to {label}") if _stderr_is_terminal() else None

    def __getitem__(self, name):
        step = self._steps.get(name)
        if step is None:
            return self._tensors[name]
        ref = self._alive.get(name)
        if ref is None:
            ref = self._alive[name] = self._quantize(step)
        return ref

    def __contains__(self, name):       # without making the weight (Mapping's would)
        return name in self._tensors

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)

    def _quantize(self, step):
        from pyforge.loader import TensorRef

        started = time.perf_counter()
        ref = TensorRef(step.name, step.ggml_type, tuple(step.source.shape), quantize_tensor(step, self._pool))
        release_pages(step.source.data)
        self.seconds += time.perf_counter() - started
        self.made[step.ggml_type] += 1
        self.bytes_in, self.bytes_out = self.bytes_in + step.source.data.nbytes, self.bytes_out + ref.data.nbytes
        if self._progress:
            self._progress.update(sum(self.made.values()))
        return ref

    def finish(self):
        """End the progress line and log what was made."""
        if self._progress:
            self._progress.close()
        _log.info("quantized %d weights to %s (%s) in %.1f s: %.2f GiB -> %.2f GiB", sum(self.made.values()),
                  self.label, _count_types(self.made.elements()), self.seconds, self.bytes_in / 2**30,
                  self.bytes_out / 2**30)


def quantize_tensor(step, pool):
    """uint8 (*shape[:-1], row bytes): the step's float tensor in its new type, in row chunks
    spread over the pool's threads (each chunk converted to float32 and quantized on one)."""
    from pyforge.native import quant

    shape, t = tuple(step.source.shape), int(step.ggml_type)
    n_in = shape[-1]
    rows = np.ascontiguousarray(step.source.data).reshape(-1, n_in)
    out = np.empty((rows.shape[0], tensor_bytes(step.ggml_type, (n_in,))), dtype=np.uint8)
    chunk = max(1, CHUNK_BYTES // (4 * n_in))

    def run(start):
        part = rows[start:start + chunk]
        x = quant.dequantize(part, int(step.source.ggml_type), part.size).reshape(part.shape)
        out[start:start + chunk] = quant.quantize(x, t, 1)

    for _ in pool.map(run, range(0, rows.shape[0], chunk)):
        pass
    return out.reshape(*shape[:-1], out.shape[-1])


def release_pages(array):
    """Drop a mapped file's pages under `array` from this process's resident set (they are
    read again from the file if anything touches them); no-op for anything but an mmap view."""
    import mmap

    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    base = base.obj if isinstance(base, memoryview) else base     # np.frombuffer's view of the map
    if not isinstance(base, mmap.mmap) or not hasattr(base, "madvise") or base.closed:
        return
    start = array.ctypes.data - np.frombuffer(base, dtype=np.uint8, count=1).ctypes.data
    page = mmap.PAGESIZE
    first, end = -(-start // page) * page, (start + array.nbytes) // page * page
    if end > first:
        base.madvise(mmap.MADV_DONTNEED, first, end - first)


class Progress:
    """A one-line progress bar on stderr (used only when stderr is a terminal)."""

    WIDTH = 30

    def __init__(self, total, label):
        self.total, self.label = total, label

    def update(self, done):
        filled = self.WIDTH * done // self.total
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total}")
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")
        sys.stderr.flush()


def _stderr_is_terminal():
    try:
        return os.isatty(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):     # replaced by a non-file (pytest, a log pipe)
        return False


def _layer(name):
    """The block index of blk.N.* names; -1 for global tensors."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit() else -1


def _count_types(types):
    return ", ".join(f"{t.name} x{n}" for t, n in sorted(Counter(types).items()))
