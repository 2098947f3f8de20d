"""Our GGUF reader against the `gguf` package's GGUFReader, and on hostile files."""
import struct
import time
import tracemalloc

import numpy as np
import pytest

from conftest import SHARED, require_module
from pyforge.ggml_types import GGMLType
from pyforge.loader import ModelFileError, load_model_file
from pyforge.loader.gguf import read_gguf

STORIES = SHARED / "models" / "stories260K" / "stories260K.gguf"
OLLAMA_TINY = SHARED / "models" / "ollama-llama-2-tiny-random" / "llama-2-tiny-random.gguf"
VOCAB_SPM = SHARED / "vocab" / "ggml-vocab-llama-spm.gguf"
VOCAB_PHI3 = SHARED / "vocab" / "ggml-vocab-phi-3.gguf"


# -- against gguf.GGUFReader ------------------------------------------------
def assert_same_as_gguf_reader(path):
    gguf = require_module("gguf")
    ref = gguf.GGUFReader(str(path))
    ours = read_gguf(path)
    try:
        ref_meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
        assert ours.metadata.keys() == ref_meta.keys()
        for key, value in ref_meta.items():
            assert ours.metadata[key] == value, key
            assert ours.value_types[key][0] == int(ref.fields[key].types[0]), key
        assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
        for info, r in zip(ours.tensors, ref.tensors):
            assert int(info.ggml_type) == int(r.tensor_type), info.name
            assert info.shape == tuple(int(d) for d in reversed(r.shape)), info.name
            view = ours.view(info)
            assert not view.data.flags.owndata and not view.data.flags.writeable   # a view of the map
            assert np.array_equal(view.data.reshape(-1).view(np.uint8), np.asarray(r.data).reshape(-1).view(np.uint8))
            if info.ggml_type in (GGMLType.F32, GGMLType.F16):
                assert view.data.shape == info.shape
    finally:
        ours.close()


@pytest.mark.parametrize("path", [STORIES, OLLAMA_TINY, VOCAB_PHI3], ids=lambda p: p.name)
def test_matches_gguf_reader_on_shared_files(path):
    assert_same_as_gguf_reader(path)


def test_matches_gguf_reader_on_synthetic_file(tmp_path):
    # (tests/test_synthetic.py compares the Q8_0 / Q4_K / Q6_K tensors of its files too)
    from pyforge.synthetic import write_gguf
    assert_same_as_gguf_reader(write_gguf("tiny-mha", tmp_path / "m.gguf", "BF16", seed=3))


def test_stories260k_model_file():
    with load_model_file(STORIES) as mf:
        c = mf.config
        assert (c.arch, c.hidden_size, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == ("llama", 64, 5, 8, 4, 8)
        assert (c.ffn_size, c.vocab_size, c.n_rot, c.context_length) == (172, 512, 8, 2048)
        assert c.rope_neox is False and c.tie_embeddings is False and c.attn_bias is False
        assert c.rms_eps == pytest.approx(1e-5) and c.rope_theta == 10000.0
        assert mf.tokenizer_source == ("gguf", mf.metadata)
        assert mf.metadata["tokenizer.ggml.bos_token_id"] == 1
        t = mf.tensors["blk.0.attn_k.weight"]
        assert t.ggml_type == GGMLType.F32 and t.shape == (32, 64) and t.data.dtype == np.float32
        assert not t.data.flags.writeable


def test_ollama_tiny_f16_and_zero_copy():
    mf = load_model_file(OLLAMA_TINY)
    emb = mf.tensors["token_embd.weight"]
    assert (emb.ggml_type, emb.shape, emb.data.dtype) == (GGMLType.F16, (32000, 8), np.float16)
    assert mf.config.vocab_size == 32000 and mf.config.n_rot == 4
    base = emb.data
    while base.base is not None and isinstance(base.base, np.ndarray):
        base = base.base
    assert not base.flags.owndata
    mf.close()
    mf.close()   # idempotent
    assert float(emb.data[0, 0]) == float(emb.data[0, 0])   # views handed out stay valid after close


def test_vocab_only_file_is_not_a_model():
    with pytest.raises(ModelFileError, match="token_embd.weight"):
        load_model_file(VOCAB_SPM)


# -- a small GGUF builder (from the spec) to make hostile files ------------
def gstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload):
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_u32(key, v):
    return kv(key, 4, struct.pack("<I", v))


def kv_f32(key, v):
    return kv(key, 6, struct.pack("<f", v))


def kv_str(key, v):
    return kv(key, 8, gstr(v))


def tinfo(name, ne, ttype, offset):
    return gstr(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ttype, offset)


def build(kvs, infos, data=b"", version=3, n_tensors=None, n_kv=None):
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % 32) + data


MICRO_KV = [kv_str("general.architecture", "llama"), kv_u32("llama.embedding_length", 8),
            kv_u32("llama.block_count", 1), kv_u32("llama.attention.head_count", 2),
            kv_u32("llama.attention.head_count_kv", 2), kv_u32("llama.feed_forward_length", 16),
            kv_u32("llama.context_length", 64), kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)]
MICRO_TENSORS = [("token_embd.weight", (4, 8)), ("output_norm.weight", (8,)), ("output.weight", (4, 8)),
                 ("blk.0.attn_norm.weight", (8,)), ("blk.0.attn_q.weight", (8, 8)), ("blk.0.attn_k.weight", (8, 8)),
                 ("blk.0.attn_v.weight", (8, 8)), ("blk.0.attn_output.weight", (8, 8)),
                 ("blk.0.ffn_norm.weight", (8,)), ("blk.0.ffn_gate.weight", (16, 8)),
                 ("blk.0.ffn_up.weight", (16, 8)), ("blk.0.ffn_down.weight", (8, 16))]


def micro(tensors=MICRO_TENSORS, kvs=MICRO_KV, **kw):
    infos, data = [], b""
    for name, shape in tensors:
        raw = np.arange(np.prod(shape), dtype=np.float32).tobytes()
        infos.append(tinfo(name, shape[::-1], 0, len(data)))
        data += raw + b"\0" * (-len(raw) % 32)
    return build(kvs, infos, data, **kw)


def test_micro_builder_is_valid(tmp_path):
    path = tmp_path / "micro.gguf"
    path.write_bytes(micro())
    assert_same_as_gguf_reader(path)
    with load_model_file(path) as mf:
        assert mf.config.hidden_size == 8 and mf.config.vocab_size == 4
        assert mf.tensors["blk.0.ffn_down.weight"].data[1, 0] == 16.0


def test_fused_qkv_splits_into_row_views(tmp_path):
    """llama.cpp loads a fused attn_qkv for any family: so do we, as zero-copy row views."""
    path = tmp_path / "fused.gguf"
    path.write_bytes(micro(MICRO_TENSORS[:4] + [("blk.0.attn_qkv.weight", (24, 8))] + MICRO_TENSORS[7:]))
    with load_model_file(path) as mf:
        fused = np.arange(24 * 8, dtype=np.float32).reshape(24, 8)
        for i, part in enumerate(("attn_q", "attn_k", "attn_v")):
            t = mf.tensors[f"blk.0.{part}.weight"]
            assert t.shape == (8, 8) and np.array_equal(t.data, fused[8 * i:8 * (i + 1)])
            assert not t.data.flags.owndata
        assert "blk.0.attn_qkv.weight" not in mf.tensors


def test_phi3_quantized_fused_tensors_split_by_rows(tmp_path):
    """Phi-3's attn_qkv and gate+up ffn_up in Q8_0: each part is its rows' blocks, byte for byte."""
    gguf = require_module("gguf")
    from pyforge.synthetic import CONFIGS, write_gguf
    cfg = CONFIGS["tiny-phi3"]
    path = write_gguf("tiny-phi3", tmp_path / "phi3.gguf", "Q8_0", seed=2)
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    with load_model_file(path) as mf:
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            qkv, gate_up = stored[p + "attn_qkv.weight"], stored[p + "ffn_up.weight"]
            q, kv = cfg.q_dim, cfg.kv_dim
            for name, rows in (("attn_q", qkv[:q]), ("attn_k", qkv[q:q + kv]), ("attn_v", qkv[q + kv:]),
                               ("ffn_gate", gate_up[:cfg.ffn_size]), ("ffn_up", gate_up[cfg.ffn_size:])):
                t = mf.tensors[p + name + ".weight"]
                assert t.ggml_type == GGMLType.Q8_0 and np.array_equal(t.data, rows), name
            assert p + "attn_qkv.weight" not in mf.tensors


def header_only(kvs, n_kv=None):
    return build(kvs, [], n_kv=n_kv)


def with_tensor(ne, ttype=0, offset=0, data=b"\0" * 256, name="t"):
    return build([], [tinfo(name, ne, ttype, offset)], data)


BIG = 1 << 60
HOSTILE = {
    "empty": (b"", ["empty"]),
    "wrong-magic": (b"GGML" + b"\0" * 60, ["not a gguf"]),
    "tiny": (b"GG", ["not a gguf"]),
    "version-1": (build([], [], version=1), ["version 1"]),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), ["big-endian"]),
    "truncated-header": (micro()[:12], ["truncated"]),
    "truncated-in-metadata": (header_only([kv_str("k", "x" * 100)])[:24 + 60], ["truncated", "'k'"]),
    "truncated-in-tensor-infos": (build([], [tinfo("t" * 40, (8,), 0, 0)])[:24 + 60], ["truncated", "tensor"]),
    "truncated-data": (micro()[:-200], ["past the end"]),
    "key-length-2^60": (header_only([struct.pack("<Q", BIG) + b"abc"]), ["length", "key"]),
    "string-length-2^60": (header_only([kv("k", 8, struct.pack("<Q", BIG) + b"xyz")]), ["length"]),
    "array-count-2^50": (header_only([kv("k", 9, struct.pack("<IQ", 4, 1 << 50))]), ["array of"]),
    "string-array-count-2^50": (header_only([kv("k", 9, struct.pack("<IQ", 8, 1 << 50))]), ["array of"]),
    "nested-arrays": (header_only([kv("k", 9, struct.pack("<IQ", 9, 1) * 6 + struct.pack("<IQ", 4, 0))]),
                      ["nested"]),
    "unknown-value-type": (header_only([kv("k", 99, b"\0" * 16)]), ["unknown value type"]),
    "unknown-array-type": (header_only([kv("k", 9, struct.pack("<IQ", 77, 1) + b"\0" * 16)]), ["element type"]),
    "bad-bool": (header_only([kv("k", 7, b"\x02")]), ["bool"]),
    "bad-utf8": (header_only([kv_str("k", b"\xff\xfe")]), ["utf-8"]),
    "duplicate-key": (header_only([kv_u32("k", 1), kv_u32("k", 2)]), ["duplicate"]),
    "kv-count-2^40": (header_only([], n_kv=1 << 40), ["metadata count"]),
    "tensor-count-2^40": (build([], [], n_tensors=1 << 40), ["tensor count"]),
    "bad-alignment": (header_only([kv_u32("general.alignment", 3)]), ["alignment"]),
    "alignment-wrong-type": (header_only([kv_str("general.alignment", "32")]), ["alignment"]),
    "offset-past-eof": (with_tensor((8,), offset=1 << 40), ["past the end"]),
    "offset-2^64-1": (with_tensor((8,), offset=(1 << 64) - 32), ["past the end"]),
    "unaligned-offset": (with_tensor((8,), offset=4), ["alignment"]),
    "unknown-tensor-type": (with_tensor((8,), ttype=99), ["unknown tensor type 99"]),
    "unsupported-tensor-type": (with_tensor((32,), ttype=6), ["unsupported tensor type q5_0"]),
    "zero-dims": (with_tensor(()), ["0 dims"]),
    "five-dims": (with_tensor((1, 1, 1, 1, 1)), ["5 dims"]),
    "dim-zero": (with_tensor((8, 0)), ["bad dimension 0"]),
    "element-overflow": (with_tensor((1 << 40, 1 << 40, 1 << 40)), ["elements"]),
    "partial-block": (with_tensor((16,), ttype=8), ["block"]),
    "huge-tensor-name": (build([], [gstr("x" * 1000) + b"\0" * 32]), ["name"]),
    "duplicate-tensor": (build([], [tinfo("t", (8,), 0, 0), tinfo("t", (8,), 0, 32)], b"\0" * 64), ["duplicate"]),
    "overlap": (build([], [tinfo("a", (16,), 0, 0), tinfo("b", (16,), 0, 32)], b"\0" * 128), ["overlap"]),
    "missing-tensor": (micro(MICRO_TENSORS[:-1]), ["missing tensor blk.0.ffn_down.weight"]),
    "wrong-shape": (micro(MICRO_TENSORS[:-1] + [("blk.0.ffn_down.weight", (16, 8))]),
                    ["blk.0.ffn_down.weight", "shape"]),
    "unexpected-tensor": (micro(MICRO_TENSORS + [("blk.0.attn_output.bias", (8,))]), ["unexpected tensor"]),
    "missing-metadata": (micro(kvs=MICRO_KV[:-1]), ["missing metadata llama.attention.layer_norm_rms_epsilon"]),
    "metadata-wrong-type": (micro(kvs=MICRO_KV[:1] + [kv_str("llama.embedding_length", "8")] + MICRO_KV[2:]),
                            ["embedding_length", "integer"]),
    "unsupported-arch": (micro(kvs=[kv_str("general.architecture", "gpt2")] + MICRO_KV[1:]), ["architecture"]),
    "absurd-config": (micro(kvs=MICRO_KV[:2] + [kv_u32("llama.block_count", 1 << 30)] + MICRO_KV[3:]),
                      ["n_layers"]),
    "fused-qkv-wrong-rows": (micro(MICRO_TENSORS[:4] + [("blk.0.attn_qkv.weight", (20, 8))] + MICRO_TENSORS[7:]),
                             ["fused tensor blk.0.attn_qkv.weight", "(20, 8)", "expected (24, 8)"]),
    "fused-and-separate": (micro(MICRO_TENSORS + [("blk.0.attn_qkv.weight", (24, 8))]),
                           ["blk.0.attn_q.weight", "both fused"]),
    "one-longrope-factor": (micro(MICRO_TENSORS + [("rope_factors_long.weight", (2,))]),
                            ["missing tensor rope_factors_short.weight"]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file(case, tmp_path):
    data, words = HOSTILE[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ModelFileError) as err:
            load_model_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(err.value)
    assert msg.startswith(str(path) + ": ")
    for w in words:
        assert w.lower() in msg.lower(), msg
    assert time.perf_counter() - start < 1.0
    assert peak < 16 << 20, f"{peak} bytes allocated"


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        load_model_file(tmp_path / "nope.gguf")
