"""The CUDA backend's routed experts (grouped launches of its matmul kernels) on the CUDA
emulator, and on a GPU where one is present: the primitive against a float64 numpy
reference (the fused matvec for few rows, dequantize + cuBLAS for more), and a Mixtral
shaped for the CUDA attention kernels against transformers and against the CPU backend."""
import numpy as np
import pytest

from conftest import require_module
from pyforge.dequant import to_float32
from pyforge.engine.engine import Engine
from pyforge.ggml_types import GGMLType
from pyforge.synthetic import write_hf_folder
from test_cuda_backend import (ENGINE_ARGS, FORMATS, IMPLS, TRANSFORMERS_BOUND, cuda_backend, cuda_shaped, prompts,
                               rel_err, run_plans, tensor_ref, with_cupy)

D, N_FF, N_EXPERTS, K = 256, 256, 4, 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("type_name", ["F16", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("n_tok", [3, 21])
def test_moe_ffn_matches_reference(impl, type_name, n_tok):
    backend = cuda_backend(impl, matvec_max_rows=4)
    rng = np.random.default_rng(n_tok)
    shapes = {"ffn_gate": (N_FF, D), "ffn_up": (N_FF, D), "ffn_down": (D, N_FF)}
    refs = {stem: [tensor_ref(f"blk.0.{stem}.{e}.weight", (rng.standard_normal(shape) * 0.05).astype(np.float32),
                              GGMLType[type_name]) for e in range(N_EXPERTS)] for stem, shape in shapes.items()}
    router = tensor_ref("blk.0.ffn_gate_inp.weight", rng.standard_normal((N_EXPERTS, D)).astype(np.float32),
                        GGMLType.F32)
    experts = backend.prepare_experts(router, refs["ffn_gate"], refs["ffn_up"], refs["ffn_down"])
    x = rng.standard_normal((n_tok, D)).astype(np.float16)
    ids, weights = backend.moe_route(backend.cupy.asarray(x), experts, K, True)
    logits = x.astype(np.float64) @ to_float32(router).T.astype(np.float64)
    assert (ids == np.argsort(-logits, axis=1)[:, :K]).all()
    out = backend.moe_ffn(backend.cupy.asarray(x), ids, weights, experts, backend.empty((n_tok, D)))
    ref = np.zeros((n_tok, D))
    for t in range(n_tok):
        for e, w in zip(ids[t], weights[t]):
            gate, up, down = (to_float32(refs[stem][e]).astype(np.float64) for stem in shapes)
            g = gate @ x[t].astype(np.float64)
            ref[t] += w * (down @ (g / (1 + np.exp(-g)) * (up @ x[t].astype(np.float64))))
    assert rel_err(backend.cupy.asnumpy(out).astype(np.float64), ref) < FORMATS["Q8_0" if type_name != "F16" else "F16"]


@pytest.mark.parametrize("impl", IMPLS)
def test_mixtral_matches_transformers_and_cpu(impl, tmp_path):
    torch = require_module("torch")
    transformers = require_module("transformers")
    folder = write_hf_folder(cuda_shaped("tiny-mixtral"), tmp_path / "hf", dtype="float32", seed=8)
    cuda = with_cupy(impl, lambda: Engine(str(folder), device="cuda", **ENGINE_ARGS))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    for ids in prompts(cuda.config.vocab_size, seed=9, lengths=(1, 40)):
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0].double().numpy()
        assert rel_err(cuda.prompt_logits(ids), expected) < TRANSFORMERS_BOUND
    cpu = Engine(str(folder), device="cpu", **ENGINE_ARGS)
    lists = prompts(cpu.config.vocab_size, seed=10, lengths=(23, 80, 70))
    steps = [[(1, 65), (2, 69)], [(0, 23), (1, 15), (2, 1)]]
    assert rel_err(run_plans(cuda, lists, steps), run_plans(cpu, lists, steps)) < FORMATS["F32"]


def test_cuda_graphs_refuse_a_moe_model(tmp_path):
    folder = write_hf_folder(cuda_shaped("tiny-mixtral"), tmp_path / "hf", dtype="float32", seed=8)
    with pytest.raises(ValueError, match="cannot run in CUDA graphs"):
        with_cupy("emulated", lambda: Engine(str(folder), device="cuda", cuda_graphs=True, **ENGINE_ARGS))


def test_each_picked_expert_is_multiplied_once_per_call():
    """Tokens grouped by expert: one gate, up and down matmul per expert any token picked, none
    for the others, whatever the batch."""
    backend = cuda_backend("emulated")
    rng = np.random.default_rng(3)
    shapes = {"ffn_gate": (64, 32), "ffn_up": (64, 32), "ffn_down": (32, 64)}
    refs = {stem: [tensor_ref(f"blk.0.{stem}.{e}.weight", rng.standard_normal(shape).astype(np.float32),
                              GGMLType.F16) for e in range(N_EXPERTS)] for stem, shape in shapes.items()}
    router = tensor_ref("blk.0.ffn_gate_inp.weight", rng.standard_normal((N_EXPERTS, 32)).astype(np.float32),
                        GGMLType.F32)
    experts = backend.prepare_experts(router, refs["ffn_gate"], refs["ffn_up"], refs["ffn_down"])
    ids = np.array([[0, 2]] * 9 + [[2, 1]] * 4, dtype=np.int32)          # expert 3 never picked
    used, matmul = [], backend.matmul
    backend.matmul = lambda x, w, out: used.append(id(w)) or matmul(x, w, out)
    x = backend.cupy.asarray(rng.standard_normal((len(ids), 32)).astype(np.float16))
    backend.moe_ffn(x, ids, np.full(ids.shape, 0.5, np.float32), experts, backend.empty((len(ids), 32)))
    expected = sorted(id(w) for e in (0, 1, 2) for w in (experts.gate[e], experts.up[e], experts.down[e]))
    assert sorted(used) == expected
