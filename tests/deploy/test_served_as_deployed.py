"""A live `pyforge serve` configured by a Deployment's environment (model, threads and
sizes swapped for a small synthetic model on this machine): the probe and scrape
paths the manifests name answer, the segment fits the /dev/shm volume, and the
metrics the EPP and the HPA read have vLLM's semantics while requests queue:

  num_requests_waiting   admitted by the engine, not running (vLLM: len(scheduler.waiting))
  num_requests_running   in the running batch
  kv_cache_usage_perc    blocks held by requests / all blocks, 0-1; blocks kept only by the
                         prefix cache count as free (vLLM: 1 - free blocks / usable blocks)
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("openai")

from deploy_manifests import (KUBERNETES, byte_count, container_env, model_servers, mount, objects,  # noqa: E402
                              volume)
from live_server import SHM, Server, get, metric, wait_for_metrics  # noqa: E402

BLOCK_SIZE = 16
KV_CACHE_TOKENS = 4096
N_BLOCKS = KV_CACHE_TOKENS // BLOCK_SIZE
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
EPP_GAUGES = ("pyforge:num_requests_waiting", "pyforge:num_requests_running", "pyforge:kv_cache_usage_perc")


@pytest.fixture(scope="module")
def deployment():
    return model_servers(objects(KUBERNETES))[0]


@pytest.fixture(scope="module")
def container(deployment):
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "pyforge")


@pytest.fixture(scope="module")
def server(container, model_path, tmp_path_factory):
    """The Deployment's environment, but this machine's model, address, threads and a
    small KV pool; one sequence at a time, so the next ones queue."""
    env = {**container_env(container), "LLM_MODEL": model_path, "LLM_HOST": "127.0.0.1", "LLM_THREADS": "1",
           "HF_HOME": str(tmp_path_factory.mktemp("hf"))}
    s = Server(None, "--kv-cache-tokens", str(KV_CACHE_TOKENS), "--block-size", str(BLOCK_SIZE),
               "--max-num-seqs", "1", workers=int(env["LLM_WORKERS"]), env=env)
    yield s
    assert s.stop() == 0
    s.assert_clean()


def model_name(container):
    return container_env(container)["LLM_SERVED_MODEL_NAME"]


def test_the_probe_and_scrape_paths_answer(deployment, container, server):
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        status, _ = get(server.url + container[probe]["httpGet"]["path"])
        assert status == 200, probe
    path = deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    status, text = get(server.url + path)
    assert status == 200
    for name in EPP_GAUGES:
        assert f"# TYPE {name} gauge" in text
        metric(text, name)


def test_the_segment_fits_the_shared_memory_volume(deployment, container, server):
    limit = byte_count(volume(deployment, mount(container, "/dev/shm")["name"])["emptyDir"]["sizeLimit"])
    (segment,) = server.segments()
    assert os.path.getsize(os.path.join(SHM, segment)) <= limit


def idle(server):
    text = wait_for_metrics(server, lambda t: metric(t, "pyforge:num_requests_running") == 0
                            and metric(t, "pyforge:num_requests_waiting") == 0)
    assert metric(text, "pyforge:num_requests_running") == 0 and metric(text, "pyforge:num_requests_waiting") == 0
    return text


def test_queued_requests_are_waiting_and_hold_no_kv_blocks(container, server):
    name = model_name(container)
    before = idle(server)
    assert metric(before, "pyforge:kv_cache_usage_perc") == 0
    long_prompt = " ".join(f"Line {i} of the long running story." for i in range(40))
    running = iter(server.client.with_options(timeout=60).completions.create(
        model=name, prompt=long_prompt, max_tokens=1500, stream=True, stream_options={"include_usage": True},
        **GREEDY))
    first = next(running)
    # prompts of several blocks each: had they claimed KV blocks while waiting, the count below would show it
    queued_prompt = " ".join(f"Queued request word {i}." for i in range(30))
    with ThreadPoolExecutor(3) as pool:
        queued = [pool.submit(server.client.with_options(timeout=120).completions.create, model=name,
                              prompt=f"{i} {queued_prompt}", max_tokens=4, **GREEDY) for i in range(3)]
        busy = wait_for_metrics(server, lambda t: metric(t, "pyforge:num_requests_waiting") == 3)
        assert metric(busy, "pyforge:num_requests_waiting") == 3
        assert metric(busy, "pyforge:num_requests_running") == 1
        rest = [first, *running]
        done = [f.result() for f in queued]
    assert rest[-1].usage.completion_tokens == 1500
    assert all(r.usage.prompt_tokens >= 4 * BLOCK_SIZE for r in done)
    # only the running request holds blocks: its prompt and what it had generated at the reading
    generated = metric(busy, "pyforge:generation_tokens_total") - metric(before, "pyforge:generation_tokens_total")
    held = metric(busy, "pyforge:kv_cache_usage_perc") * N_BLOCKS
    assert held == pytest.approx(round(held), abs=1e-9), "a fraction of whole blocks"
    expected = math.ceil((rest[-1].usage.prompt_tokens + generated) / BLOCK_SIZE)
    assert abs(round(held) - expected) <= 1, (held, expected)      # the gauges and the counter may be a step apart


def test_blocks_kept_only_by_the_prefix_cache_count_as_free(container, server):
    name = model_name(container)
    prompt = " ".join(f"Cached sentence number {i}." for i in range(30))
    first = server.client.completions.create(model=name, prompt=prompt, max_tokens=2, **GREEDY)
    assert first.usage.prompt_tokens >= 4 * BLOCK_SIZE
    assert metric(idle(server), "pyforge:kv_cache_usage_perc") == 0
    again = server.client.completions.create(model=name, prompt=prompt, max_tokens=2, **GREEDY)
    assert again.usage.prompt_tokens_details.cached_tokens >= 4 * BLOCK_SIZE    # they were still cached
