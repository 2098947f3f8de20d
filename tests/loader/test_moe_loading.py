"""Mixture-of-experts files: family detection, config.json options, the expert layouts, and a
clear error for each bad one."""
import json

import numpy as np
import pytest

from pyforge.ggml_types import GGMLType
from pyforge.loader import ModelFileError, TensorRef, load_model_file
from pyforge.loader.hf import config_from_hf
from pyforge.loader.names import canonical_to_hf, hf_to_canonical, split_experts
from pyforge.models.registry import family, family_of_gguf
from pyforge.synthetic import CONFIGS, hf_config_dict, write_gguf, write_hf_folder


def test_a_llama_gguf_with_experts_is_mixtral():
    assert family_of_gguf("llama", {"llama.expert_count": 8}).arch == "mixtral"
    assert family_of_gguf("llama", {}).arch == "llama"
    assert family_of_gguf("qwen3moe", {"qwen3moe.expert_count": 8}).arch == "qwen3moe"
    assert family_of_gguf("nonesuch", {}) is None


@pytest.mark.parametrize("arch,hf,ours", [
    ("mixtral", "model.layers.3.block_sparse_moe.experts.7.w1.weight", "blk.3.ffn_gate.7.weight"),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.0.w2.weight", "blk.0.ffn_down.0.weight"),
    ("mixtral", "model.layers.0.block_sparse_moe.gate.weight", "blk.0.ffn_gate_inp.weight"),
    ("qwen3moe", "model.layers.1.mlp.experts.12.up_proj.weight", "blk.1.ffn_up.12.weight"),
    ("qwen3moe", "model.layers.1.mlp.gate.weight", "blk.1.ffn_gate_inp.weight"),
    ("qwen3moe", "model.layers.0.mlp.gate_proj.weight", "blk.0.ffn_gate.weight"),    # a dense layer
])
def test_expert_names_map_both_ways(arch, hf, ours):
    assert hf_to_canonical(hf, family(arch)) == ours
    assert canonical_to_hf(ours, family(arch)) == hf


def test_unknown_expert_tensor_names_are_unknown():
    assert hf_to_canonical("model.layers.0.block_sparse_moe.experts.0.w4.weight", family("mixtral")) is None
    assert hf_to_canonical("model.layers.0.block_sparse_moe.experts.01.w1.weight", family("mixtral")) is None


def test_qwen3_moe_dense_layers_from_config_json():
    cfg = hf_config_dict(CONFIGS["tiny-qwen3-moe-dense"])
    assert (cfg["decoder_sparse_step"], cfg["mlp_only_layers"]) == (2, [3])
    parsed = config_from_hf(cfg)
    assert parsed.dense_layers == (0, 2, 3) and parsed.moe_layers == (1,) and parsed.norm_topk_prob is False


@pytest.mark.parametrize("key,value,message", [
    ("num_experts_per_tok", 9, "n_experts_used must be an integer in 1..8"),
    ("decoder_sparse_step", 0, "decoder_sparse_step must be positive"),
    ("mlp_only_layers", "0,1", "mlp_only_layers must be a list"),
    ("norm_topk_prob", "yes", "norm_topk_prob must be a bool"),
    ("num_experts", 1.5, "num_experts must be an integer"),
])
def test_bad_moe_config_json_is_refused(key, value, message):
    cfg = {**hf_config_dict(CONFIGS["tiny-qwen3-moe"]), key: value}
    with pytest.raises(ModelFileError, match=message):
        config_from_hf(cfg)


def test_merged_experts_split_into_views():
    cfg = CONFIGS["tiny-mixtral"]
    merged = np.arange(4 * 128 * 64, dtype=np.float32).reshape(4, 128, 64)
    tensors = {f"blk.{i}.ffn_gate_exps.weight": TensorRef("x", GGMLType.F32, merged.shape, merged) for i in (0, 1)}
    split_experts("m.gguf", cfg, tensors)
    assert sorted(tensors) == sorted(f"blk.{i}.ffn_gate.{e}.weight" for i in (0, 1) for e in range(4))
    part = tensors["blk.1.ffn_gate.2.weight"]
    assert part.shape == (128, 64) and np.shares_memory(part.data, merged) and (part.data == merged[2]).all()


def test_merged_experts_of_the_wrong_shape_are_refused():
    cfg = CONFIGS["tiny-mixtral"]
    bad = np.zeros((3, 128, 64), np.float32)
    expected = r"blk.0.ffn_up_exps.weight has shape \(3, 128, 64\), expected \(4, 128, 64\)"
    with pytest.raises(ModelFileError, match=expected):
        split_experts("m.gguf", cfg, {"blk.0.ffn_up_exps.weight": TensorRef("x", GGMLType.F32, bad.shape, bad)})


def test_both_gguf_layouts_load_the_same_tensors(tmp_path):
    merged = load_model_file(write_gguf("tiny-qwen3-moe", tmp_path / "a.gguf", "Q8_0", seed=2))
    split = load_model_file(write_gguf("tiny-qwen3-moe", tmp_path / "b.gguf", "Q8_0", seed=2, merged_experts=False))
    assert merged.config == split.config and merged.tensors.keys() == split.tensors.keys()
    for name, ref in merged.tensors.items():
        assert ref.ggml_type == split.tensors[name].ggml_type and np.array_equal(ref.data, split.tensors[name].data)


def test_an_expert_count_the_weights_do_not_have_is_named(tmp_path):
    folder = write_hf_folder("tiny-mixtral", tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 5}))
    expected = r"blk.0.ffn_gate_inp.weight \(model.layers.0.block_sparse_moe.gate.weight\) has shape \(4, 64\)"
    with pytest.raises(ModelFileError, match=expected + r", expected \(5, 64\)"):
        load_model_file(folder)


def test_a_gguf_cannot_hold_qwen3_moe_dense_layers(tmp_path):
    with pytest.raises(ValueError, match="a qwen3moe GGUF cannot hold this config"):
        write_gguf("tiny-qwen3-moe-dense", tmp_path / "m.gguf")
