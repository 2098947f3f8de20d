"""Embeddings (engine/pooling.py) against Hugging Face transformers (torch, CPU,
float32): the base model's last_hidden_state (after the final norm) pooled by mean
or last token and L2-normalised, on synthetic models; several prompts in one
step, prefills chunked by a small token budget, generation alongside."""
import numpy as np
import pytest

from conftest import require_module
from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.synthetic import write_hf_folder

REL_TOL = 1e-4
LENGTHS = (1, 7, 40, 100)       # 40 and 100 span several chunks of max_num_batched_tokens=32


def rel_err(ours, ref):
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module", params=["tiny-gqa", "tiny-qwen2"])
def pair(request, tmp_path_factory):
    torch = require_module("torch")
    transformers = require_module("transformers")
    folder = write_hf_folder(request.param, tmp_path_factory.mktemp(request.param), dtype="float32", seed=7)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ref.eval()
    engine = Engine(str(folder), n_threads=2, max_model_len=512, kv_cache_tokens=2048, block_size=16,
                    max_num_batched_tokens=32)

    def reference(ids, pooling):
        with torch.no_grad():
            hidden = ref.model(torch.tensor([ids])).last_hidden_state[0].double().numpy()
        v = hidden.mean(axis=0) if pooling == "mean" else hidden[-1]
        return v / np.linalg.norm(v)

    return engine, reference


def prompts(vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in LENGTHS]


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_one_prompt_at_a_time_matches(pair, pooling):
    engine, reference = pair
    for ids in prompts(engine.config.vocab_size):
        ours = engine.embed(ids, pooling)
        assert ours.dtype == np.float32 and ours.shape == (engine.config.hidden_size,)
        assert abs(np.linalg.norm(ours) - 1.0) < 1e-5
        assert rel_err(ours, reference(ids, pooling)) < REL_TOL
    assert engine.block_manager.num_free == engine.block_manager.n_blocks


def test_batched_with_generation_and_chunked_prefill(pair):
    """Every prompt at once, in both poolings, with a generating request in the same steps:
    the budget of 32 tokens chunks the long prompts over several steps; each embedding
    comes once, finished "stop", and every KV block is free at the end."""
    engine, reference = pair
    ids_list = prompts(engine.config.vocab_size, seed=3)
    gen = engine.add_request(ids_list[2], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    seqs = {engine.add_request(ids, SamplingParams(pooling=pooling)).seq_id: (ids, pooling)
            for ids in ids_list for pooling in ("mean", "last")}
    got, tokens, steps = {}, [], 0
    while engine.has_work:
        steps += 1
        for out in engine.step():
            if out.embedding is not None:
                assert out.seq_id not in got and out.finish_reason == "stop"
                got[out.seq_id] = out.embedding
            else:
                assert out.seq_id == gen.seq_id
                tokens.append(out.token_id)
    assert steps > 100 * 2 // 32
    assert set(got) == set(seqs) and len(tokens) == 8
    for seq_id, (ids, pooling) in seqs.items():
        assert rel_err(got[seq_id], reference(ids, pooling)) < REL_TOL
    assert engine.block_manager.num_free == engine.block_manager.n_blocks


def test_preempted_mean_pooling_counts_each_row_once(pair):
    """A sequence preempted after a chunk recomputes from scratch: its pooled sum does not
    take the recomputed rows twice."""
    engine, reference = pair
    ids = prompts(engine.config.vocab_size, seed=5)[3]
    seq = engine.add_request(ids, SamplingParams(pooling="mean"))
    engine.step()
    assert 0 < seq.num_computed_tokens < len(ids)
    engine.scheduler.preempt(seq)
    out = None
    while engine.has_work:
        out = next((o for o in engine.step() if o.seq_id == seq.seq_id), out)
    assert rel_err(out.embedding, reference(ids, "mean")) < REL_TOL


def test_a_failed_embedding_pass_ends_only_its_sequences(pair):
    """The embedding entries run a forward pass of their own: when it fails, only they end
    (a StepError naming them, carrying the generating sequences' outputs)."""
    from pyforge.engine.engine import StepError

    engine, _ = pair
    gen = engine.add_request([5, 6, 7], SamplingParams(max_tokens=2, temperature=0.0))
    emb = engine.add_request([5, 6, 7], SamplingParams(pooling="mean"))
    real = engine.runner.hidden
    engine.runner.hidden = lambda batch: (_ for _ in ()).throw(MemoryError("no room"))
    try:
        with pytest.raises(StepError) as e:
            engine.step()
    finally:
        engine.runner.hidden = real
    assert e.value.seq_ids == [emb.seq_id] and e.value.out_of_memory
    assert [out.seq_id for out in e.value.outputs] == [gen.seq_id]
    while engine.has_work:
        engine.step()
    assert engine.block_manager.num_free == engine.block_manager.n_blocks


def test_embedding_params_take_no_generation_fields():
    for extra in ({"logprobs": 1}, {"prompt_logprobs": 0}, {"grammar": "start: /a/"}):
        with pytest.raises(ValueError, match="embedding"):
            SamplingParams(pooling="mean", **extra)
    with pytest.raises(ValueError, match="pooling"):
        SamplingParams(pooling="max")


def test_the_null_model_embeds_a_constant_unit_vector(model_path):
    """--null-model (no forward pass) still answers embeddings: every row of ones, normalised."""
    engine = Engine(model_path, n_threads=1, max_model_len=64, kv_cache_tokens=256, null_model=True)
    d = engine.config.hidden_size
    for pooling in ("mean", "last"):
        assert np.allclose(engine.embed([5, 6, 7], pooling), np.full(d, 1 / np.sqrt(d)), atol=1e-7)
