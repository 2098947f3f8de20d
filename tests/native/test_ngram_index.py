"""The native n-gram index against a brute-force reference: the same drafts for
random histories over small vocabularies (many repeats), fed whole or a few
tokens at a time, and clear errors for bad arguments."""
import random

import pytest

from pyforge.native.ngram_index import MAX_NGRAM, NgramIndex


def reference_propose(tokens, k, min_n, max_n):
    """Scan the whole history: the longest n-gram of the tail (max_n down to min_n)
    with an earlier occurrence, its most recent one, and what followed it (copying on
    from the draft itself where the copy reaches the present)."""
    last = len(tokens) - 1
    for n in range(min(max_n, len(tokens)), min_n - 1, -1):
        tail = tokens[last - n + 1:]
        for end in range(last - 1, n - 2, -1):
            if tokens[end - n + 1:end + 1] == tail:
                draft = []
                for j in range(k):
                    src = end + 1 + j
                    draft.append(tokens[src] if src < len(tokens) else draft[src - len(tokens)])
                return draft
    return []


@pytest.mark.parametrize("min_n, max_n, vocab", [(1, 1, 3), (2, 4, 4), (1, 5, 6), (3, 3, 2), (2, 8, 3)])
def test_drafts_match_the_reference_token_by_token(min_n, max_n, vocab):
    rng = random.Random(min_n * 100 + max_n * 10 + vocab)
    for _ in range(20):
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 120))]
        index = NgramIndex(min_n, max_n)
        fed = 0
        while fed < len(tokens):        # grow a few tokens at a time, asking after each
            fed = min(len(tokens), fed + rng.randrange(1, 5))
            index.extend(tokens[:fed])
            k = rng.randrange(0, 7)
            assert index.propose(k) == reference_propose(tokens[:fed], k, min_n, max_n), (tokens[:fed], k)
        assert len(index) == len(tokens)


def test_a_loop_drafts_past_the_present_and_a_fresh_tail_drafts_nothing():
    index = NgramIndex(2, 4)
    index.extend([9, 1, 2, 3, 1, 2, 3, 1, 2])
    assert index.propose(7) == [3, 1, 2, 3, 1, 2, 3]
    index.extend([9, 1, 2, 3, 1, 2, 3, 1, 2, 7])
    assert index.propose(4) == []       # "2 7" never occurred before
    assert index.propose(0) == []


def test_table_growth_keeps_every_entry():
    index = NgramIndex(1, 3)
    tokens = list(range(5000)) + list(range(5000))     # distinct n-grams: the table regrows many times
    index.extend(tokens[:7000])     # ends 0..6998 indexed: 5000 distinct n-grams of each length
    assert index.num_entries == 3 * 5000
    assert index.propose(3) == [2000, 2001, 2002]


def test_large_token_ids_and_long_ngrams():
    big = [2**31 - 1, 0, 2**30, 123456789]
    index = NgramIndex(MAX_NGRAM, MAX_NGRAM)
    tokens = big * 40
    index.extend(tokens)
    assert index.propose(5) == reference_propose(tokens, 5, MAX_NGRAM, MAX_NGRAM) == tokens[:5]


@pytest.mark.parametrize("min_n, max_n", [(0, 2), (3, 2), (1, MAX_NGRAM + 1)])
def test_bad_lengths_are_refused(min_n, max_n):
    with pytest.raises(ValueError, match="n-gram lengths"):
        NgramIndex(min_n, max_n)


def test_a_shrinking_history_and_a_negative_k_are_refused():
    index = NgramIndex(1, 2)
    index.extend([1, 2, 3])
    with pytest.raises(ValueError, match="only grows"):
        index.extend([1, 2])
    with pytest.raises(ValueError, match="k must be >= 0"):
        index.propose(-1)
