"""safetensors reader: JSON header, zero-copy numpy views over an mmap.

Layout:  u64 N (little-endian) | N bytes of JSON | data
JSON:    {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
          "__metadata__": {str: str}}   offsets are relative to the data start.

The file is untrusted: header size, JSON, dtypes, shapes and offsets are all
checked against the file before a view is made.
"""
import json
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from pyforge.ggml_types import GGMLType
from pyforge.loader import ModelFileError, TensorRef
from pyforge.loader.gguf import _close_map, open_mapped

MAX_HEADER = 100 * 1000 * 1000
MAX_NDIM = 8
MAX_DIM = 1 << 40

# safetensors dtype -> numpy dtype of the view
DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
# known to the format, not readable here
OTHER_DTYPES = {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64", "U1", "I4", "U4"}
# dtypes a model weight may have
WEIGHT_TYPES = {"F32": GGMLType.F32, "F16": GGMLType.F16, "BF16": GGMLType.BF16}


@dataclass
class SafetensorsEntry:
    name: str
    dtype: str          # safetensors dtype string
    shape: tuple
    offset: int         # absolute file offset
    nbytes: int


@dataclass
class SafetensorsFile:
    path: str
    entries: dict                   # name -> SafetensorsEntry
    metadata: dict                  # the header's __metadata__ (str -> str)
    _map: object = field(default=None, repr=False)

    def array(self, name):
        """Zero-copy numpy view of one tensor (BF16 as uint16)."""
        e = self.entries[name]
        dtype = np.dtype(DTYPES[e.dtype])
        if e.nbytes == 0:
            return np.empty(e.shape, dtype=dtype)
        arr = np.frombuffer(self._map, dtype=dtype, count=e.nbytes // dtype.itemsize, offset=e.offset)
        arr = arr.reshape(e.shape)
        if not arr.flags.aligned:        # the format does not promise alignment; kernels need it
            arr = arr.copy()
        return arr

    def tensor_ref(self, name, canonical_name=None):
        e = self.entries[name]
        if e.dtype not in WEIGHT_TYPES:
            raise ModelFileError(self.path, f"tensor {name} has dtype {e.dtype}; weights must be F32, F16 or BF16")
        return TensorRef(canonical_name or name, WEIGHT_TYPES[e.dtype], e.shape, self.array(name))

    def close(self):
        _close_map(self._map)
        self._map = None


def read_safetensors(path):
    path = os.fspath(path)
    m, size = open_mapped(path)
    try:
        entries, metadata = _parse_header(path, m, size)
        return SafetensorsFile(path, entries, metadata, m)
    except BaseException:
        _close_map(m)
        raise


def _parse_header(path, buf, size):
    def fail(problem):
        raise ModelFileError(path, problem)

    if size < 8:
        fail(f"truncated file: {size} bytes, too small for a safetensors header")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > MAX_HEADER:
        fail(f"corrupt header: header length {n} exceeds the {MAX_HEADER}-byte limit")
    if 8 + n > size:
        fail(f"truncated or corrupt: header length {n} runs past the end of the {size}-byte file")
    raw = bytes(buf[8:8 + n])
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        fail(f"header is not valid JSON: {str(e)[:200]}")
    if not isinstance(header, dict):
        fail("header JSON must be an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        fail("__metadata__ must map strings to strings")
    data_start, data_len = 8 + n, size - 8 - n
    entries = {name: _entry(fail, name, info, data_start, data_len) for name, info in header.items()}
    prev = None
    for e in sorted(entries.values(), key=lambda e: (e.offset, e.nbytes)):
        if prev is not None and e.offset < prev.offset + prev.nbytes:
            fail(f"tensors {prev.name!r} and {e.name!r} overlap")
        prev = e
    return entries, metadata


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _entry(fail, name, info, data_start, data_len):
    if not isinstance(info, dict):
        fail(f"tensor {name!r}: header entry must be an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype in OTHER_DTYPES:
        fail(f"tensor {name!r} has unsupported dtype {dtype}")
    if dtype not in DTYPES:
        fail(f"tensor {name!r} has unknown dtype {_short(dtype)}")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)):
        fail(f"tensor {name!r} has a bad shape {_short(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        fail(f"tensor {name!r} has bad data_offsets {_short(offsets)}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        fail(f"tensor {name!r} data_offsets [{begin}, {end}] lie outside the {data_len}-byte data section")
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * np.dtype(DTYPES[dtype]).itemsize
    if end - begin != nbytes:
        fail(f"tensor {name!r}: data_offsets span {end - begin} bytes but {dtype} {shape} needs {nbytes}")
    return SafetensorsEntry(name, dtype, tuple(shape), data_start + begin, nbytes)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v):
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."
