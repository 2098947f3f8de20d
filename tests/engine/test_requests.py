"""The request table both engine loops share: every request gets its replies in
order (admitted, tokens, then exactly one finished or failed) and is forgotten."""
import pytest

from conftest import fail_next_run
from pyforge.engine.engine import Engine
from pyforge.engine.requests import RequestTable
from pyforge.engine.sampling_params import SamplingParams
from pyforge.server.engine_client import HTTP_STATUS

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
PROMPTS = [[1, 450, 4996, 17354], [1, 3118, 29871, 42, 7], [1, 910, 338, 263, 1243, 29889]]


class Recorder:
    """Replies as (request id, what) tuples, in order."""

    def __init__(self):
        self.log = []

    def admitted(self, entry):
        self.log.append((entry.request_id, "admitted"))

    def tokens(self, entry, out):
        self.log.append((entry.request_id, "token"))

    def finished(self, entry, reason):
        self.log.append((entry.request_id, "finished", reason))

    def failed(self, entry, kind, message):
        self.log.append((entry.request_id, "failed", HTTP_STATUS[kind]))

    def of(self, request_id):
        return [r[1:] for r in self.log if r[0] == request_id]


@pytest.fixture
def table(model_path):
    engine = Engine(model_path, n_threads=1, max_model_len=128, kv_cache_tokens=512, max_num_seqs=2)
    return RequestTable(engine, Recorder())


def run(table):
    while table.engine.has_work:
        table.step()


def test_each_request_is_admitted_streamed_and_finished_once(table):
    for i, prompt in enumerate(PROMPTS):
        table.admit(i, owner=None, prompt_ids=prompt, params=GREEDY)
    run(table)
    for i in range(3):
        assert table.replies.of(i) == [("admitted",)] + [("token",)] * 4 + [("finished", "length")]
    assert len(table) == 0 and table.started_prompt_tokens == sum(map(len, PROMPTS))
    blocks = table.engine.block_manager
    assert blocks.num_free == blocks.n_blocks


def test_a_refused_request_gets_its_failure_alone(table):
    table.admit(7, None, PROMPTS[0], GREEDY)
    assert table.admit(7, None, PROMPTS[1], GREEDY) is None            # the id is taken
    assert table.admit(8, None, [], GREEDY) is None                    # an empty prompt
    assert table.replies.of(8) == [("failed", 400)]
    assert table.replies.log.count((7, "failed", 400)) == 1 and len(table) == 1


def test_an_abort_finishes_with_abort_and_frees_blocks(table):
    table.admit(1, None, PROMPTS[0], SamplingParams(max_tokens=100, ignore_eos=True))
    table.step()
    table.abort(1)
    table.abort(1)                                                      # a second abort: nothing more
    assert table.replies.of(1) == [("admitted",), ("token",), ("finished", "abort")]
    blocks = table.engine.block_manager
    assert len(table) == 0 and blocks.num_free == blocks.n_blocks


def test_a_failed_step_fails_its_requests_only(table):
    for i, prompt in enumerate(PROMPTS):
        table.admit(i, None, prompt, GREEDY)
    fail_next_run(table.engine, MemoryError("injected"))
    table.step()                                                        # requests 0 and 1 ran in it
    run(table)
    assert table.replies.of(0) == table.replies.of(1) == [("admitted",), ("failed", 503)]
    assert table.replies.of(2)[-1] == ("finished", "length") and len(table) == 0


def test_a_bug_in_the_step_fails_every_request(table, monkeypatch):
    for i, prompt in enumerate(PROMPTS):
        table.admit(i, None, prompt, GREEDY)
    monkeypatch.setattr(table.engine, "step", lambda: 1 / 0)
    assert table.step() == 0
    assert all(table.replies.of(i) == [("admitted",), ("failed", 500)] for i in range(3))
    assert len(table) == 0 and not table.engine.has_work
