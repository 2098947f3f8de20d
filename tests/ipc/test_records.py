"""Record encode/decode: round trips of random records, hostile bytes."""
import random
import struct

import pytest

from pyforge.engine.errors import ErrorKind
from pyforge.engine.sampling_params import SamplingParams
from pyforge.ipc.records import (HEADER, Abort, Error, Finish, RecordType, Submit, Tokens, decode, decode_batch,
                                 encode, encode_batch, encode_token, request_id, slot_of)

INT32 = (-(1 << 31), (1 << 31) - 1)


def f32(x):
    """x as the float32 it travels as."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def random_record(rng):
    rid = rng.randrange(1 << 64)
    kind = rng.randrange(5)
    if kind == 0:
        params = SamplingParams(temperature=rng.random() * 2, top_p=rng.random() or 1.0, top_k=rng.randrange(-1, 100),
                                max_tokens=rng.randrange(1, 5000), seed=rng.choice([None, rng.randrange(1 << 64)]),
                                stop_token_ids=[rng.randrange(50000) for _ in range(rng.randrange(3))],
                                ignore_eos=rng.random() < 0.5, logprobs=rng.choice([None, 0, 5]),
                                grammar=rng.choice([None, '{"grammars": [{"lark_grammar": "start: \\"✓\\""}]}']))
        return Submit(rid, rng.randrange(1 << 16), [rng.randint(*INT32) for _ in range(rng.randrange(300))], params)
    if kind == 1:
        return Abort(rid)
    if kind == 2:
        n, n_top = rng.randrange(5), rng.randrange(4)
        logprobs = [f32(-rng.expovariate(1)) for _ in range(n)] if rng.random() < 0.5 else None
        top = None
        if rng.random() < 0.5:
            top = [[(rng.randrange(1 << 17), f32(-rng.random() * 9)) for _ in range(n_top)] for _ in range(n)]
        return Tokens(rid, [rng.randrange(1 << 17) for _ in range(n)], logprobs, top)
    if kind == 3:
        return Finish(rid, rng.choice(["stop", "length", "abort"]), *(rng.randrange(1 << 32) for _ in range(3)))
    message = "".join(rng.choice("abc ✓\n") for _ in range(rng.randrange(40)))
    return Error(rid, rng.choice(list(ErrorKind)), message)


def test_random_records_round_trip():
    rng = random.Random(0)
    for _ in range(500):
        record = random_record(rng)
        assert decode(encode(record)) == record


def test_each_type_round_trips_and_has_its_type_byte():
    records = [Submit(1, 2, [1, 2, 3], SamplingParams(temperature=0.0)), Abort(5),
               Tokens(6, [7], [-0.5], [[(7, -0.5), (8, -2.0)]]), Tokens(6, [], None, None),
               Finish(9, "stop", 10, 2, 4), Error(11, ErrorKind.SHUTTING_DOWN, "engine is draining")]
    for record in records:
        data = encode(record)
        assert data[0] == record.TYPE and decode(data) == record
    assert len(encode(Abort(5))) == HEADER.size == 12


def test_sampling_params_travel_packed_and_exact():
    params = SamplingParams(temperature=0.7, top_k=40, min_p=0.05, repetition_penalty=1.1, presence_penalty=-0.5,
                            frequency_penalty=0.25, seed=1234, stop_token_ids=[2, 13], logprobs=3, ignore_eos=True)
    data = encode(Submit(request_id(3, 17), 3, [1, 2], params))
    record = decode(data)
    assert record.params == params and record.prompt_ids == [1, 2] and record.extensions == b""
    assert slot_of(record.request_id) == 3
    assert len(data) == HEADER.size + 8 + 68 + 2 * 4 + 2 * 4 + 4     # the layout the docstring draws
    # a seed of any size travels as its residue mod 2^64, which is all the RNG uses
    assert decode(encode(Submit(1, 0, [1], SamplingParams(seed=-5)))).params.seed == 2**64 - 5


def test_a_grammar_travels_as_an_extension_entry_and_unknown_entries_stay_unknown():
    grammar = '{"grammars": [{"json_schema": {"type": "object"}}]} ✓'
    data = encode(Submit(5, 1, [1, 2], SamplingParams(grammar=grammar)))
    entry = grammar.encode()
    assert data.endswith(struct.pack("<IHHI", 8 + len(entry), 1, 0, len(entry)) + entry)   # n_ext | tag 1 | 0 | n
    assert decode(data).params.grammar == grammar
    unknown = struct.pack("<HHI", 77, 0, 3) + b"abc"      # a later build's feature: kept, for the engine to refuse
    record = decode(encode(Submit(6, 1, [1], SamplingParams(grammar=grammar), extensions=unknown)))
    assert record.params.grammar == grammar and record.extensions == unknown
    with pytest.raises(ValueError, match="extensions"):
        decode(encode(Submit(7, 1, [1], SamplingParams(), extensions=b"\x01")))


def test_truncated_records_raise_value_error():
    rng = random.Random(1)
    for _ in range(60):
        data = encode(random_record(rng))
        for cut in range(len(data)):
            with pytest.raises(ValueError):
                decode(data[:cut])
        with pytest.raises(ValueError, match="stray"):
            decode(data + b"\0")


def test_garbage_and_mutations_raise_only_value_error():
    rng = random.Random(2)
    samples = [rng.randbytes(rng.randrange(64)) for _ in range(2000)]
    for _ in range(300):
        data = bytearray(encode(random_record(rng)))
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        samples.append(bytes(data))
    for data in samples:
        try:
            decode(data)
        except ValueError:
            pass


def test_hostile_counts_fail_before_allocating():
    params = struct.pack("<ddddddiIQBBH", 1, 1, 0, 1, 0, 0, 0, 16, 0, 0, 0, 0)
    for counts in (struct.pack("<IHH", 0xFFFFFFFF, 1, 0), struct.pack("<IHH", 0, 1, 0xFFFF)):
        with pytest.raises(ValueError, match="truncated"):     # prompt ids, stop ids
            decode(HEADER.pack(RecordType.SUBMIT, 0, 0, 1) + counts + params)
    with pytest.raises(ValueError, match="truncated"):         # extensions
        decode(HEADER.pack(RecordType.SUBMIT, 0, 0, 1) + struct.pack("<IHH", 0, 1, 0) + params
               + struct.pack("<I", 0xFFFFFFFF))
    with pytest.raises(ValueError, match="truncated"):
        decode(HEADER.pack(RecordType.TOKENS, 0, 0, 1) + struct.pack("<IHH", 0xFFFFFFFF, 0xFFFF, 3))


@pytest.mark.parametrize("data, match", [
    (HEADER.pack(99, 0, 0, 1), "unknown record type"),
    (HEADER.pack(RecordType.ABORT, 1, 0, 1), "flags"),
    (HEADER.pack(RecordType.TOKENS, 0, 0, 1) + struct.pack("<IHH", 0, 0, 8), "flags"),
    (HEADER.pack(RecordType.SUBMIT, 0, 0, 1) + struct.pack("<IHH", 0, 2, 0), "params version 2"),
    (HEADER.pack(RecordType.SUBMIT, 0, 0, 1) + struct.pack("<IHH", 0, 1, 0) + b"\0" * 20, "truncated"),
    (HEADER.pack(RecordType.SUBMIT, 0, 0, 1) + struct.pack("<IHH", 0, 1, 0)
     + struct.pack("<ddddddiIQBBH", float("nan"), 1, 0, 1, 0, 0, 0, 16, 0, 0, 0, 0) + struct.pack("<I", 0),
     "temperature must be a number"),
    (HEADER.pack(RecordType.ERROR, 0, 0, 1) + struct.pack("<HI", 5, 2) + b"\xff\xfe", "UTF-8"),
    (HEADER.pack(RecordType.ERROR, 0, 0, 1) + struct.pack("<HI", 500, 0), "unknown error kind 500"),
    (HEADER.pack(RecordType.FINISH, 0, 0, 1) + struct.pack("<IIIB", 1, 1, 0, 9), "unknown finish reason 9"),
    (b"", "truncated"),
])
def test_malformed_records_say_why(data, match):
    with pytest.raises(ValueError, match=match):
        decode(data)


@pytest.mark.parametrize("record", [
    Submit(1, 1 << 16, [1], SamplingParams()),        # worker beyond u16
    Submit(1 << 64, 0, [1], SamplingParams()),        # request id beyond u64
    Submit(1, 0, [1 << 31], SamplingParams()),        # token id beyond int32
    Submit(1, 0, [1.5], SamplingParams()),
    Finish(1, "tired", 1, 1),                         # not a finish reason
    Tokens(1, [1, 2], [-0.1]),                        # one logprob for two tokens
    Tokens(1, [1, 2], None, [[(1, -0.1)], []]),       # ragged top_logprobs
    Error(1, 503, "an HTTP status, not an ErrorKind"),
])
def test_unencodable_records_raise_value_error(record):
    with pytest.raises(ValueError):
        encode(record)


# -- batches: response ring messages ------------------------------------------------

def test_one_token_fast_encoding_is_the_tokens_record():
    for rid, token in [(0, 0), (1 << 63, 31999), ((1 << 64) - 1, -(1 << 31)), (5, (1 << 31) - 1)]:
        assert encode_token(rid, token) == encode(Tokens(rid, [token]))
        assert decode_batch(encode_token(rid, token)) == [Tokens(rid, [token])]
    with pytest.raises(ValueError):
        encode_token(1 << 64, 0)
    with pytest.raises(ValueError):
        encode_token(1, 1 << 31)


def test_a_coalesced_tokens_record_round_trips():
    record = Tokens(7, [5, 6, 7, 8], [f32(-0.25), f32(-1.5), 0.0, f32(-3.0)],
                    [[(5, f32(-0.25)), (9, f32(-2.0))], [(6, f32(-1.5)), (1, f32(-1.75))],
                     [(7, 0.0), (2, f32(-20.0))], [(3, f32(-1.0)), (8, f32(-3.0))]])
    assert decode(encode(record)) == record
    assert decode_batch(encode_batch([record, Finish(7, "length", 3, 4)])) == [record, Finish(7, "length", 3, 4)]


def test_random_batches_round_trip():
    rng = random.Random(3)
    for _ in range(300):
        records = [random_record(rng) for _ in range(rng.randrange(1, 12))]
        records += [Tokens(rng.randrange(1 << 64), [rng.randint(*INT32)]) for _ in range(rng.randrange(4))]
        rng.shuffle(records)
        data = encode_batch(records)
        assert data == b"".join(encode(r) for r in records)
        assert decode_batch(data) == records


def test_truncated_or_padded_batches_raise_value_error():
    rng = random.Random(4)
    for _ in range(40):
        records = [random_record(rng) for _ in range(rng.randrange(1, 4))] + [Tokens(9, [3])]
        rng.shuffle(records)
        data = encode_batch(records)
        ends = [len(encode_batch(records[:k])) for k in range(len(records) + 1)]
        for cut in range(len(data)):
            if cut in ends[1:]:                             # a record boundary: a shorter, valid batch
                assert decode_batch(data[:cut]) == records[:ends.index(cut)]
            else:
                with pytest.raises(ValueError):
                    decode_batch(data[:cut])
        with pytest.raises(ValueError):
            decode_batch(data + b"\0")


def test_batch_fast_path_defers_odd_records_to_the_checks():
    one = bytearray(encode_token(1, 2))
    one[1] = 1                                            # flags set: the generic path says why
    with pytest.raises(ValueError, match="flags"):
        decode_batch(bytes(one))
    bad_has = HEADER.pack(RecordType.TOKENS, 0, 0, 1) + struct.pack("<IHHi", 1, 0, 8, 5)
    with pytest.raises(ValueError, match="flags"):
        decode_batch(bad_has)
    with_lp = encode(Tokens(1, [2], [f32(-0.5)]))         # one token with a logprob: not the fast layout
    assert decode_batch(with_lp + encode_token(3, 4)) == [Tokens(1, [2], [f32(-0.5)]), Tokens(3, [4])]
