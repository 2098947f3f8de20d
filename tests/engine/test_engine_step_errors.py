"""A forward pass that raises (out of GPU memory, say) ends the sequences of that step
only: they are aborted with their KV blocks freed, the engine steps on, and a request
that was waiting meanwhile generates what it would have generated anyway."""
import pytest

from conftest import fail_next_run
from pyforge.engine.engine import Engine, StepError
from pyforge.engine.sampling_params import SamplingParams
from pyforge.engine.sequence import SequenceStatus
from pyforge.synthetic import write_gguf

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[1, 450, 4996, 17354], [1, 3118, 29871, 42, 7], [1, 910, 338, 263, 1243, 29889]]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(write_gguf("tiny-gqa", tmp_path_factory.mktemp("model") / "tiny-gqa.gguf", "F32"))


def make_engine(model_path):     # two sequences a step: the third prompt waits
    return Engine(model_path, n_threads=2, max_model_len=128, kv_cache_tokens=512, block_size=16, max_num_seqs=2)


def generate_all(engine, seqs):
    tokens = {s.seq_id: [] for s in seqs}
    while engine.has_work:
        for out in engine.step():
            tokens[out.seq_id].append(out.token_id)
    return [tokens[s.seq_id] for s in seqs]


@pytest.mark.parametrize("error, out_of_memory", [(MemoryError("injected"), True), (RuntimeError("injected"), False)])
def test_a_failed_step_ends_only_its_sequences(model_path, error, out_of_memory):
    reference = generate_all(ref := make_engine(model_path), [ref.add_request(p, GREEDY) for p in PROMPTS])
    engine = make_engine(model_path)
    a, b, c = [engine.add_request(p, GREEDY) for p in PROMPTS]
    fail_next_run(engine, error)
    with pytest.raises(StepError) as raised:
        engine.step()
    assert raised.value.seq_ids == [a.seq_id, b.seq_id]
    assert raised.value.out_of_memory is out_of_memory and raised.value.__cause__ is error
    assert a.status == b.status == SequenceStatus.FINISHED_ABORTED
    assert engine.block_manager.num_free == engine.block_manager.n_blocks      # nothing held for a or b
    assert generate_all(engine, [c]) == [reference[2]]
    assert engine.block_manager.num_free == engine.block_manager.n_blocks


def test_a_row_that_fails_to_sample_ends_only_its_sequence(model_path):
    """Sampling is batched: a row whose values break the batch is found by sampling the
    rows alone, and only its sequence ends; the others get this step's token."""
    reference = generate_all(ref := make_engine(model_path), [ref.add_request(p, GREEDY) for p in PROMPTS[:2]])
    engine = make_engine(model_path)
    a, b = [engine.add_request(p, GREEDY) for p in PROMPTS[:2]]
    real = engine.sampler.sample

    def sample(logits, seqs, masks=None):
        if any(s is b for s in seqs):
            raise OverflowError("injected: this row's values do not pack")
        return real(logits, seqs, masks)
    engine.sampler.sample = sample
    with pytest.raises(StepError) as raised:
        engine.step()
    assert raised.value.seq_ids == [b.seq_id] and [o.seq_id for o in raised.value.outputs] == [a.seq_id]
    assert b.status == SequenceStatus.FINISHED_ABORTED
    engine.sampler.sample = real
    first = raised.value.outputs[0].token_id
    assert [first, *generate_all(engine, [a])[0]] == reference[0]
    assert engine.block_manager.num_free == engine.block_manager.n_blocks


def test_values_that_would_not_pack_are_refused_at_admission(model_path):
    engine = make_engine(model_path)
    params = SamplingParams(max_tokens=4)
    object.__setattr__(params, "top_k", 2**40)      # past SamplingParams' own check, as a bug would be
    with pytest.raises(ValueError, match="out of range"):
        engine.add_request(PROMPTS[0], params)
    assert not engine.has_work
