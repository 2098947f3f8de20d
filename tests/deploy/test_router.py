"""pyforge replicas behind SGLang's router (sglang-router from PyPI), all on loopback:
completions and chat, streamed or not, reach every replica; a replica's error comes
back with its status; a replica that dies is dropped by the router's health check
and requests keep succeeding."""
import json
import os
import signal
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("sglang_router")

from deploy_manifests import ROUTER, containers, flag_values, objects, of_kind  # noqa: E402
from live_router import Router  # noqa: E402
from live_server import SHM, Server, descendants, get, metric  # noqa: E402

MODEL = "tiny-gqa"


@pytest.fixture(scope="module")
def replicas(model_path):
    servers = [Server(model_path, workers=1) for _ in range(2)]
    yield servers
    for s in servers:
        assert s.stop() == 0
        s.assert_clean()


@pytest.fixture(scope="module")
def router(replicas):
    r = Router([s.url for s in replicas], policy="round_robin")
    yield r
    r.stop()


def served(server):
    """Generation requests the replica answered successfully so far."""
    return metric(get(server.url + "/metrics")[1], "pyforge:request_success_total")


def healthy(router):
    """{worker url: whether the router counts it healthy} (its GET /workers)."""
    return {w["url"]: w["is_healthy"] for w in json.loads(get(router.url + "/workers")[1])["workers"]}


def test_completions_and_chat_reach_every_replica(router, replicas):
    before = [served(s) for s in replicas]
    for i in range(4):
        completion = router.client.completions.create(model=MODEL, prompt=f"Story {i}:", max_tokens=4,
                                                      temperature=0)
        assert completion.usage.completion_tokens >= 1
        assert completion.choices[0].finish_reason in ("length", "stop")
        chat = router.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Hi {i}"}],
                                                     max_tokens=4, temperature=0)
        assert chat.choices[0].message.role == "assistant"
        assert chat.usage.prompt_tokens > 0
    gained = [served(s) - b for s, b in zip(replicas, before)]
    assert sum(gained) == 8
    assert all(g > 0 for g in gained), gained


def test_the_router_passes_the_same_answer_through(router, replicas):
    """Greedy output through the router is what a replica answers directly."""
    body = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    direct = replicas[0].client.completions.create(**body)
    routed = [router.client.completions.create(**body) for _ in range(2)]   # round robin: both replicas
    assert [r.choices[0].text for r in routed] == [direct.choices[0].text] * 2


def test_streams_pass_through(router):
    stream = router.client.completions.create(model=MODEL, prompt="Once", max_tokens=6, temperature=0,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 6
    chat = router.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                                 max_tokens=5, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in chat if c.choices]
    assert "".join(pieces)


def test_errors_pass_through_with_their_status(router, replicas):
    bad = dict(model=MODEL, prompt="word " * 3000, max_tokens=4)      # longer than the context: pyforge's 400
    with pytest.raises(openai.BadRequestError) as direct:
        replicas[0].client.completions.create(**bad)
    with pytest.raises(openai.BadRequestError) as routed:
        router.client.completions.create(**bad)
    assert routed.value.status_code == 400
    assert routed.value.body == direct.value.body       # pyforge's own error object, whole


def test_cache_aware_keeps_a_prefix_on_one_replica(replicas):
    """Requests sharing a long prefix, one after another: after the first, each finds the
    prefix cached, since the router sends it where the prefix went (round robin would not)."""
    router = Router([s.url for s in replicas], policy="cache_aware")
    try:
        for topic in ("rivers", "mountains"):
            prefix = f"A long document about {topic}. " + " ".join(f"Fact {i} about {topic}." for i in range(40))
            answers = [router.client.completions.create(model=MODEL, prompt=f"{prefix} Question {q}?", max_tokens=2,
                                                        temperature=0) for q in range(3)]
            cached = [a.usage.prompt_tokens_details.cached_tokens for a in answers]
            assert cached[0] == 0 and all(c >= 16 * 8 for c in cached[1:]), (topic, cached)
    finally:
        router.stop()


def wait_until(done, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def crash(server):
    """Kill every process of the replica at once (no drain), and remove the segment its launcher left."""
    for pid in [server.proc.pid, *descendants(server.proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    server.proc.wait(10)
    for name in server.segments():
        os.unlink(os.path.join(SHM, name))


class Clients:
    """One client sending small completions back to back through the router until stopped."""

    def __init__(self, router):
        self.router, self.answered, self.failures = router, [], []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            try:
                r = self.router.client.completions.create(model=MODEL, prompt="Keep going", max_tokens=3,
                                                          temperature=0)
                self.answered.append(r.usage.completion_tokens)
            except openai.APIError as e:
                self.failures.append(repr(e))

    def stop(self):
        self.stopping.set()
        self.thread.join(60)


def test_a_dead_replica_is_dropped_and_requests_keep_succeeding(model_path, replicas):
    survivor, doomed = replicas[0], Server(model_path, workers=1)
    router = Router([survivor.url, doomed.url], policy="round_robin")
    clients = None
    try:
        assert healthy(router) == {survivor.url: True, doomed.url: True}
        before = served(doomed)
        clients = Clients(router)
        wait_until(lambda: served(doomed) > before, "the doomed replica got no request")     # mid-run
        crash(doomed)
        # the router's health check (every second) drops it; requests keep succeeding meanwhile and after
        wait_until(lambda: not healthy(router)[doomed.url], "the router still counts the dead replica healthy")
        n = len(clients.answered)
        wait_until(lambda: len(clients.answered) >= n + 10, "requests stopped succeeding")
    finally:
        if clients is not None:
            clients.stop()
        router.stop()
        if doomed.proc.poll() is None:
            doomed.stop()
    assert clients.failures == [], clients.failures[:3]
    assert all(tokens == 3 for tokens in clients.answered)


def test_the_router_manifest_is_what_the_router_accepts_and_its_probes_answer(router):
    (deployment,) = of_kind(objects(ROUTER), "Deployment")
    (container,) = containers(deployment)
    from sglang_router.launch_router import parse_router_args
    args = parse_router_args([a.replace("$(POD_NAMESPACE)", "default") for a in container["args"]])
    assert args.service_discovery and args.policy == "cache_aware"
    assert args.selector == dict(item.split("=", 1) for item in flag_values(container["args"], "selector"))
    for probe in ("livenessProbe", "readinessProbe"):
        assert get(router.url + container[probe]["httpGet"]["path"])[0] == 200, probe
