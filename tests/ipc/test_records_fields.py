"""The request fields that travel as SUBMIT extension entries (logit_bias, min_tokens,
prompt_logprobs, pooling) and the PROMPT_LOGPROBS and EMBEDDING replies: byte layouts as
records.py and native/pyforge_ipc.h draw them, round trips, malformed entries."""
import struct

import pytest

from pyforge.engine.sampling_params import SamplingParams
from pyforge.ipc.records import (HEADER, Embedding, PromptLogprobs, RecordType, Submit, Tokens, decode, decode_batch,
                                 encode, encode_batch)


def extensions(data):
    """The extension bytes at the end of an encoded SUBMIT with a one-token prompt and no stop ids."""
    at = HEADER.size + 8 + 68 + 4
    (n_ext,) = struct.unpack_from("<I", data, at)
    return data[at + 4:at + 4 + n_ext]


def test_each_field_is_an_entry_of_its_own_layout():
    params = SamplingParams(logit_bias={7: -100, 3: 2.5}, min_tokens=4, prompt_logprobs=2)
    data = encode(Submit(1, 0, [1], params))
    assert extensions(data) == (
        struct.pack("<HHI", 2, 0, 24) + struct.pack("<ii", 3, 7) + struct.pack("<dd", 2.5, -100.0)
        + struct.pack("<HHII", 3, 0, 4, 4)
        + struct.pack("<HHII", 4, 0, 4, 2))
    record = decode(data)
    assert record.params == params and record.extensions == b""
    assert record.params.logit_bias == ((3, 2.5), (7, -100.0))


def test_unset_fields_send_nothing_and_zero_top_is_sent():
    assert extensions(encode(Submit(1, 0, [1], SamplingParams()))) == b""
    assert decode(encode(Submit(1, 0, [1], SamplingParams(prompt_logprobs=0)))).params.prompt_logprobs == 0


def test_biases_travel_exactly():
    params = SamplingParams(logit_bias={1: 0.1, 2: -1 / 3, 2**31 - 1: 100})
    assert decode(encode(Submit(1, 0, [1], params))).params.logit_bias == params.logit_bias


@pytest.mark.parametrize("entry, match", [
    (struct.pack("<HHI", 2, 0, 13) + bytes(13), "whole entries"),
    (struct.pack("<HHI", 3, 0, 5) + bytes(5), "stray bytes"),
    (struct.pack("<HHI", 4, 0, 2) + bytes(2), "truncated"),
    (struct.pack("<HHI", 2, 0, 12) + struct.pack("<id", 5, 101.0), "logit_bias"),     # SamplingParams' range
    (struct.pack("<HHI", 3, 0, 4) + struct.pack("<I", 17), "min_tokens"),             # past max_tokens (16)
])
def test_malformed_entries_raise_value_error(entry, match):
    data = encode(Submit(1, 0, [1], SamplingParams()))
    data = data[:-4] + struct.pack("<I", len(entry)) + entry
    with pytest.raises(ValueError, match=match):
        decode(data)


def test_prompt_logprobs_reply_is_the_tokens_layout_under_its_own_type():
    record = PromptLogprobs(9, [5, 6], [-0.5, -1.25], [[(5, -0.5), (1, -2.0)], [(6, -1.25), (2, -3.0)]])
    data = encode(record)
    tokens = encode(Tokens(9, record.token_ids, record.logprobs, record.top_logprobs))
    assert data[0] == RecordType.PROMPT_LOGPROBS and data[1:] == tokens[1:]
    back = decode(data)
    assert type(back) is PromptLogprobs and back == record
    assert [type(r) for r in decode_batch(encode_batch([record, Tokens(9, [7])]))] == [PromptLogprobs, Tokens]
    no_top = PromptLogprobs(9, [5], [-0.5], [[]])            # prompt_logprobs=0: no alternatives
    assert decode(encode(no_top)) == no_top
    with pytest.raises(ValueError, match="PROMPT_LOGPROBS"):
        decode(bytes([RecordType.PROMPT_LOGPROBS]) + encode(Tokens(9, [5], [-0.5]))[1:])


def test_pooling_is_an_entry_and_the_embedding_a_float32_vector():
    """An embedding request: a POOLING entry (u32: 1 mean, 2 last) in its SUBMIT; its reply an
    EMBEDDING record, u32 n then f32 values[n], of any length (a long one travels in fragments)."""
    for pooling, code in (("mean", 1), ("last", 2)):
        data = encode(Submit(1, 0, [1], SamplingParams(pooling=pooling)))
        assert extensions(data) == struct.pack("<HHII", 5, 0, 4, code)
        assert decode(data).params.pooling == pooling
    values = [0.5, -0.25, 1 / 3]
    data = encode(Embedding(9, values))
    assert data[0] == RecordType.EMBEDDING == 8
    assert data[HEADER.size:] == struct.pack("<I3f", 3, *values)
    back = decode(data)
    assert type(back) is Embedding and back.request_id == 9 and back.values == list(struct.unpack("<3f", data[-12:]))
    big = Embedding(9, [float(i) for i in range(16384)])
    assert decode_batch(encode_batch([big, Tokens(9, [7])])) == [big, Tokens(9, [7])]
    with pytest.raises(ValueError, match="truncated"):
        decode(data[:-1])


def test_an_unknown_pooling_is_refused():
    entry = struct.pack("<HHII", 5, 0, 4, 3)
    data = encode(Submit(1, 0, [1], SamplingParams()))
    with pytest.raises(ValueError, match="pooling"):
        decode(data[:-4] + struct.pack("<I", len(entry)) + entry)


@pytest.mark.parametrize("max_drafts", [0, 1, 7])
def test_a_draft_cap_is_a_u32_entry(max_drafts):
    data = encode(Submit(1, 0, [1], SamplingParams(max_drafts=max_drafts)))
    assert extensions(data) == struct.pack("<HHII", 6, 0, 4, max_drafts)
    assert decode(data).params.max_drafts == max_drafts
    assert decode(encode(Submit(1, 0, [1], SamplingParams()))).params.max_drafts is None
