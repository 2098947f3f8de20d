"""SamplingParams: defaults, accepted spellings, and ValueErrors that name the field."""
import dataclasses

import numpy as np
import pytest

from pyforge.engine.sampling_params import SamplingParams


def test_defaults_follow_openai():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.stop_token_ids, p.ignore_eos, p.logprobs) == (None, 16, (), False, None)


def test_frozen_and_hashable_with_list_stop_ids():
    p = SamplingParams(stop_token_ids=[2, 7])
    assert p.stop_token_ids == (2, 7)
    hash(p)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5


@pytest.mark.parametrize("kwargs", [
    dict(top_k=-1), dict(top_k=0), dict(top_k=50),
    dict(temperature=0.0), dict(temperature=100.0), dict(top_p=1e-6), dict(min_p=1.0),
    dict(presence_penalty=-2.0, frequency_penalty=2.0), dict(repetition_penalty=1e-3),
    dict(logprobs=0), dict(logprobs=20), dict(seed=-5), dict(seed=2**70),
    dict(max_tokens=1), dict(temperature=np.float32(0.5), top_k=np.int64(3)),
])
def test_accepts_edges(kwargs):
    SamplingParams(**kwargs)


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", 100.5), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.01),
    ("top_k", -2), ("top_k", 1.5),
    ("min_p", -0.01), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", float("inf")),
    ("presence_penalty", 2.5), ("frequency_penalty", -2.01),
    ("max_tokens", 0), ("max_tokens", 3.0),
    ("logprobs", -1), ("logprobs", 21),
    ("seed", 1.5), ("seed", True),
    ("stop_token_ids", [1, -3]), ("stop_token_ids", 5),
    ("ignore_eos", "yes"),
])
def test_rejects_out_of_range_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
