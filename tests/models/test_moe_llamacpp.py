"""MoE GGUFs in llama.cpp's layout (a Mixtral is a "llama" file with expert_count; merged
blk.{i}.ffn_*_exps.weight experts, an F32 router) against llama.cpp through llama-cpp-python."""
import numpy as np
import pytest

from conftest import require_module
from pyforge.loader.gguf import read_gguf
from pyforge.synthetic import write_gguf
from test_llama_llamacpp import F32_REL_TOL, assert_agrees_with_llama_cpp

MOE_FILES = [("tiny-mixtral", "F32"), ("tiny-mixtral", "Q8_0"), ("tiny-mixtral-mha", "F16"),
             ("tiny-qwen3-moe", "F32"), ("tiny-qwen3-moe", "Q8_0")]


@pytest.mark.parametrize("config,fmt", MOE_FILES, ids=lambda v: v)
def test_moe_gguf_logits_agree(config, fmt, tmp_path):
    llama_cpp = require_module("llama_cpp")
    path = write_gguf(config, tmp_path / f"{config}-{fmt}.gguf", fmt, seed=13)
    gf = read_gguf(path)
    arch, names = gf.metadata["general.architecture"], {t.name for t in gf.tensors}
    gf.close()
    assert arch == ("llama" if "mixtral" in config else "qwen3moe")
    assert "blk.0.ffn_down_exps.weight" in names
    ours, ref = assert_agrees_with_llama_cpp(llama_cpp, path, 150)
    if fmt == "F32":
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < F32_REL_TOL
