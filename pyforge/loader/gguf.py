"""GGUF reader: metadata, tensor directory, zero-copy tensor views over an mmap.

Layout (little-endian; versions 2 and 3):

    header   "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    kv       n_kv x (string key | u32 value type | value)
    tensors  n_tensors x (string name | u32 n_dims | n_dims x u64 ne (ne[0] fastest)
                          | u32 ggml type | u64 offset from the data section)
    padding  to `general.alignment` (default 32)
    data     tensor bytes, each at an aligned offset

    string = u64 length | utf-8 bytes;  array = u32 element type | u64 count | elements

The file is untrusted: every length, count and offset is checked against the
bytes that remain before anything is sized from it.
"""
import mmap
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from pyforge.ggml_types import BLOCK_LAYOUT, GGMLType
from pyforge.loader import ModelFile, ModelFileError, TensorRef, check_tensors, validated
from pyforge.loader.names import split_experts, split_fused
from pyforge.models.config import ModelConfig
from pyforge.models.registry import SUPPORTED, family_of_gguf

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20
MAX_TENSORS = 1_000_000
MAX_KV = 1_000_000
MAX_DIMS = 4
MAX_DIM = 1 << 40
MAX_ELEMENTS = 1 << 48
MAX_NAME = 256
MAX_ARRAY_DEPTH = 3

# metadata value types: id -> (name, struct format, size, numpy dtype)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALARS = {
    UINT8: ("<B", 1, "<u1"), INT8: ("<b", 1, "<i1"), UINT16: ("<H", 2, "<u2"), INT16: ("<h", 2, "<i2"),
    UINT32: ("<I", 4, "<u4"), INT32: ("<i", 4, "<i4"), FLOAT32: ("<f", 4, "<f4"), BOOL: ("<B", 1, "<u1"),
    UINT64: ("<Q", 8, "<u8"), INT64: ("<q", 8, "<i8"), FLOAT64: ("<d", 8, "<f8"),
}
VALUE_TYPE_NAMES = ["UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL",
                    "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64"]

# ggml type ids we know by name but cannot run (for error messages only)
OTHER_GGML_TYPES = {3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K",
                    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
                    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
                    29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}

VIEW_DTYPES = {GGMLType.F32: np.float32, GGMLType.F16: np.float16, GGMLType.BF16: np.uint16}



@dataclass
class GGUFTensorInfo:
    name: str
    ggml_type: GGMLType
    shape: tuple       # numpy order (reversed ne)
    offset: int        # absolute file offset of the first byte
    nbytes: int


@dataclass
class GGUFFile:
    """A parsed GGUF file: metadata plus the tensor directory over the mapping."""
    path: str
    version: int
    metadata: dict                  # key -> python value (arrays as lists)
    value_types: dict               # key -> (value type, element type or None)
    tensors: list                   # GGUFTensorInfo, in file order
    alignment: int
    data_offset: int
    _map: object = field(default=None, repr=False)

    def view(self, info):
        """A zero-copy TensorRef over the mapped bytes."""
        dtype = VIEW_DTYPES.get(info.ggml_type)
        if dtype is not None:
            count, shape = info.nbytes // np.dtype(dtype).itemsize, info.shape
        else:
            dtype, count = np.uint8, info.nbytes
            shape = (*info.shape[:-1], info.nbytes // _n_rows(info.shape))
        data = np.frombuffer(self._map, dtype=dtype, count=count, offset=info.offset).reshape(shape)
        return TensorRef(info.name, info.ggml_type, info.shape, data)

    def close(self):
        _close_map(self._map)
        self._map = None


def _n_rows(shape):
    n = 1
    for d in shape[:-1]:
        n *= d
    return n


def _close_map(m):
    if m is None:
        return
    try:
        m.close()
    except BufferError:
        pass    # numpy views still alive: the mapping goes when the last one does


def open_mapped(path):
    """(mmap, size) of a non-empty file, read-only."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelFileError(path, "file is empty")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size
    except OSError as e:
        raise ModelFileError(path, f"cannot open: {e.strerror or e}") from None


def read_gguf(path):
    """Parse a GGUF file's header, metadata and tensor directory (data stays mapped)."""
    path = os.fspath(path)
    m, size = open_mapped(path)
    try:
        return _Parser(path, m, size).parse()
    except BaseException:
        _close_map(m)
        raise


class _Parser:
    def __init__(self, path, buf, size):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, problem):
        raise ModelFileError(self.path, problem)

    @property
    def left(self):
        return self.size - self.pos

    def take(self, n, what):
        if n > self.left:
            self.fail(f"truncated file: {what} at offset {self.pos} needs {n} bytes, {self.left} left")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, vtype, what):
        fmt, n, _ = SCALARS[vtype]
        return struct.unpack_from(fmt, self.buf, self.take(n, what))[0]

    def string(self, what, max_len=None):
        n = self.scalar(UINT64, f"length of {what}")
        if n > self.left:
            self.fail(f"truncated or corrupt: {what} has length {n} but only {self.left} bytes are left")
        if max_len is not None and n > max_len:
            self.fail(f"{what} is {n} bytes long (at most {max_len} allowed)")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    # -- header --------------------------------------------------------
    def parse(self):
        if self.size < 4 or bytes(self.buf[:4]) != MAGIC:
            head = bytes(self.buf[:4])
            self.fail(f"not a GGUF file (magic {head!r}, expected {MAGIC!r})")
        self.pos = 4
        version = self.scalar(UINT32, "version")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0 and version >> 16:
                self.fail("big-endian GGUF files are not supported")
            self.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors = self.scalar(UINT64, "tensor count")
        n_kv = self.scalar(UINT64, "metadata count")
        # smallest possible entries: kv = key len 8 + type 4 + 1 byte; tensor = 8 + 4 + 8 + 4 + 8
        if n_kv > MAX_KV or n_kv * 13 > self.left:
            self.fail(f"corrupt header: metadata count {n_kv} is impossible for a {self.size}-byte file")
        if n_tensors > MAX_TENSORS or n_tensors * 32 > self.left:
            self.fail(f"corrupt header: tensor count {n_tensors} is impossible for a {self.size}-byte file")
        metadata, types = self.metadata(n_kv)
        alignment = self.alignment(metadata, types)
        infos = [self.tensor_info(i) for i in range(n_tensors)]
        data_offset = -(-self.pos // alignment) * alignment
        self.place_tensors(infos, data_offset, alignment)
        return GGUFFile(self.path, version, metadata, types, infos, alignment, data_offset, self.buf)

    # -- metadata ------------------------------------------------------
    def metadata(self, n_kv):
        metadata, types = {}, {}
        for i in range(n_kv):
            key = self.string(f"metadata key #{i}", max_len=1 << 16)
            if key in metadata:
                self.fail(f"duplicate metadata key {key!r}")
            vtype = self.scalar(UINT32, f"type of metadata {key!r}")
            if vtype == ARRAY:
                value, etype = self.array(key, 0)
                types[key] = (ARRAY, etype)
            else:
                value = self.value(vtype, key)
                types[key] = (vtype, None)
            metadata[key] = value
        return metadata, types

    def value(self, vtype, key):
        if vtype == STRING:
            return self.string(f"metadata {key!r}")
        if vtype not in SCALARS:
            self.fail(f"metadata {key!r} has unknown value type {vtype}")
        v = self.scalar(vtype, f"metadata {key!r}")
        if vtype == BOOL:
            if v > 1:
                self.fail(f"metadata {key!r}: bool byte is {v}, expected 0 or 1")
            return bool(v)
        return v

    def array(self, key, depth):
        """(list, element type) for an array value; sizes checked before any list is built."""
        if depth >= MAX_ARRAY_DEPTH:
            self.fail(f"metadata {key!r}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
        etype = self.scalar(UINT32, f"element type of metadata {key!r}")
        count = self.scalar(UINT64, f"length of metadata {key!r}")
        if etype in SCALARS:
            esize = SCALARS[etype][1]
        elif etype == STRING:
            esize = 8
        elif etype == ARRAY:
            esize = 12
        else:
            self.fail(f"metadata {key!r}: unknown array element type {etype}")
        if count > self.left // esize:
            self.fail(f"truncated or corrupt: metadata {key!r} is an array of {count} elements "
                      f"but only {self.left} bytes are left")
        if count == 0:
            return [], etype
        if etype in SCALARS:
            start = self.take(count * esize, f"metadata {key!r}")
            arr = np.frombuffer(self.buf, dtype=SCALARS[etype][2], count=count, offset=start)
            if etype == BOOL:
                if int(arr.max()) > 1:
                    self.fail(f"metadata {key!r}: bool array holds a byte other than 0 or 1")
                return (arr != 0).tolist(), etype
            return arr.tolist(), etype
        if etype == STRING:
            return self.string_array(key, count), etype
        return [self.array(key, depth + 1)[0] for _ in range(count)], etype

    def string_array(self, key, count):
        buf, size, pos = self.buf, self.size, self.pos
        out = []
        unpack = struct.Struct("<Q").unpack_from
        for i in range(count):
            if size - pos < 8:
                self.pos = pos
                self.fail(f"truncated file: metadata {key!r}[{i}] length at offset {pos}")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                self.pos = pos
                self.fail(f"truncated or corrupt: metadata {key!r}[{i}] has length {n} "
                          f"but only {size - pos} bytes are left")
            try:
                out.append(buf[pos:pos + n].decode("utf-8"))
            except UnicodeDecodeError:
                self.fail(f"metadata {key!r}[{i}] is not valid UTF-8")
            pos += n
        self.pos = pos
        return out

    def alignment(self, metadata, types):
        if "general.alignment" not in metadata:
            return DEFAULT_ALIGNMENT
        a = metadata["general.alignment"]
        if types["general.alignment"][0] != UINT32 or not 0 < a <= MAX_ALIGNMENT or a & (a - 1):
            self.fail(f"general.alignment must be a UINT32 power of two up to {MAX_ALIGNMENT}, got {a!r}")
        return a

    # -- tensor directory ----------------------------------------------
    def tensor_info(self, i):
        name = self.string(f"name of tensor #{i}", max_len=MAX_NAME)
        n_dims = self.scalar(UINT32, f"tensor {name!r} dims")
        if not 1 <= n_dims <= MAX_DIMS:
            self.fail(f"tensor {name!r} has {n_dims} dims (1..{MAX_DIMS} allowed)")
        ne = struct.unpack_from(f"<{n_dims}Q", self.buf, self.take(8 * n_dims, f"tensor {name!r} shape"))
        n = 1
        for d in ne:
            if not 0 < d <= MAX_DIM:
                self.fail(f"tensor {name!r} has bad dimension {d} in shape {list(ne)}")
            n *= d
        if n > MAX_ELEMENTS:
            self.fail(f"tensor {name!r} has {n} elements, too many")
        type_id = self.scalar(UINT32, f"tensor {name!r} type")
        try:
            ggml_type = GGMLType(type_id)
        except ValueError:
            known = OTHER_GGML_TYPES.get(type_id)
            what = f"unsupported tensor type {known} ({type_id})" if known else f"unknown tensor type {type_id}"
            self.fail(f"tensor {name!r} has {what}")
        block, block_bytes = BLOCK_LAYOUT[ggml_type]
        if ne[0] % block:
            self.fail(f"tensor {name!r}: row length {ne[0]} is not a multiple of the {ggml_type.name} block ({block})")
        offset = self.scalar(UINT64, f"tensor {name!r} offset")
        return GGUFTensorInfo(name, ggml_type, tuple(reversed(ne)), offset, n // block * block_bytes)

    def place_tensors(self, infos, data_offset, alignment):
        """Absolute offsets; aligned, inside the file, no two tensors sharing bytes."""
        seen = set()
        for t in infos:
            if t.name in seen:
                self.fail(f"duplicate tensor name {t.name!r}")
            seen.add(t.name)
            if t.offset % alignment:
                self.fail(f"tensor {t.name!r} offset {t.offset} is not a multiple of the alignment {alignment}")
            end = data_offset + t.offset + t.nbytes
            if end > self.size:
                self.fail(f"truncated or corrupt: tensor {t.name!r} ({t.nbytes} bytes at data offset {t.offset}) "
                          f"ends at byte {end}, past the end of the {self.size}-byte file")
            t.offset += data_offset
        prev = None
        for t in sorted(infos, key=lambda t: t.offset):
            if prev is not None and t.offset < prev.offset + prev.nbytes:
                self.fail(f"tensors {prev.name!r} and {t.name!r} overlap")
            prev = t


# -- GGUF -> ModelFile ------------------------------------------------------
def load_gguf(path):
    path = os.fspath(path)
    gf = read_gguf(path)
    try:
        tensors = {t.name: gf.view(t) for t in gf.tensors}
        config = validated(path, config_from_gguf(path, gf.metadata, tensors))
        split_fused(path, config, tensors)
        split_experts(path, config, tensors)
        check_tensors(path, config, tensors)
        return ModelFile(path, config, tensors, gf.metadata, ("gguf", gf.metadata), closers=[gf.close])
    except BaseException:
        tensors = None
        gf.close()
        raise


def config_from_gguf(path, meta, tensors):
    def fail(problem):
        raise ModelFileError(path, problem)

    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        fail("metadata general.architecture is missing or not a string")
    fam = family_of_gguf(arch, meta)        # a llama file with experts is Mixtral's
    if fam is None:
        fail(f"unsupported architecture {arch!r} (supported: {SUPPORTED})")
    if "token_embd.weight" not in tensors:
        fail("missing tensor token_embd.weight" + ("" if tensors else " (the file holds no tensors: vocabulary only?)"))

    def number(key, kind, default=None):
        full = f"{arch}.{key}"
        if full not in meta:
            if default is None:
                fail(f"missing metadata {full}")
            return default
        v = meta[full]
        ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok:
            fail(f"metadata {full} must be {'an integer' if kind is int else 'a number'}, got {_short(v)}")
        return kind(v)

    hidden = number("embedding_length", int)
    n_heads = number("attention.head_count", int)
    if n_heads <= 0:
        fail(f"metadata {arch}.attention.head_count must be positive, got {n_heads}")
    head_dim = number("attention.key_length", int, hidden // n_heads)
    if number("attention.value_length", int, head_dim) != head_dim:
        fail("attention.value_length differs from attention.key_length (unsupported)")
    n_layers = number("block_count", int)
    context = number("context_length", int)
    options = fam.gguf_options(number, n_layers)
    if fam.window_all_layers and number("attention.sliding_window", int, 0) > 0:
        options.update(sliding_window=number("attention.sliding_window", int), sliding_layers=tuple(range(n_layers)))
    fields = dict(
        arch=fam.arch,
        hidden_size=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=number("attention.head_count_kv", int, n_heads),
        head_dim=head_dim,
        ffn_size=number("feed_forward_length", int),
        vocab_size=int(tensors["token_embd.weight"].shape[0]),
        rms_eps=number(fam.gguf_eps_key, float),
        rope_theta=number("rope.freq_base", float, 10000.0),
        n_rot=number("rope.dimension_count", int, head_dim),
        rope_neox=fam.gguf_rope_neox,
        rope_scaling=_rope_scaling(path, meta, arch, number, tensors, context),
        context_length=context,
        tie_embeddings="output.weight" not in tensors,
        attn_bias="blk.0.attn_q.bias" in tensors or "blk.0.attn_qkv.bias" in tensors,
    )
    return ModelConfig(**{**fields, **options})


def _rope_scaling(path, meta, arch, number, tensors, context):
    if "rope_factors_long.weight" in tensors or "rope_factors_short.weight" in tensors:
        # longrope (Phi-3): the factors are tensors, the attention factor llama.cpp's attn_factor
        for which in ("long", "short"):
            if f"rope_factors_{which}.weight" not in tensors:
                raise ModelFileError(path, f"missing tensor rope_factors_{which}.weight (longrope needs both)")
        return {"rope_type": "longrope",
                "original_max_position_embeddings": number("rope.scaling.original_context_length", int, context),
                "attention_factor": number("rope.scaling.attn_factor", float, 1.0)}
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": str(kind)}
    if f"{arch}.rope.scaling.factor" in meta:
        scaling["factor"] = number("rope.scaling.factor", float)
    if f"{arch}.rope.scaling.original_context_length" in meta:
        scaling["original_max_position_embeddings"] = number("rope.scaling.original_context_length", int)
    return scaling


def _short(v):
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."
