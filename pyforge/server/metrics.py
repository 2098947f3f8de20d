"""Metrics: what workers and the engine write to the segment, as Prometheus text.

The engine writes its gauges and token counters into the segment's engine
stats (pyforge/serving/engine_process.py). Each worker process writes request counts and
latency histograms into its own slot through `SegmentObserver`, the app's
observer hook. `/metrics`, served by any worker, reads the whole segment, so
every worker gives the same answer: the sum over all slots.

Names are vLLM's with our prefix (STYLE.md 12): pyforge:<name>, counters with
_total, histograms with _bucket / _sum / _count, labelled with model_name.
"""
import math
import threading

from pyforge.ipc.segment import ENGINE_STATS, WORKER_STATS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "pyforge:"

class SegmentObserver:
    """The app's observer hook, writing to this worker's slot of the segment
    (the segment object must hold a slot: IpcEngineClient claims it)."""

    def __init__(self, segment):
        self.seg = segment
        self._first = threading.local()     # the token call right after on_first_token is not an ITL

    def on_request_start(self):
        self.seg.add("requests")

    def on_first_token(self, seconds):
        self.seg.observe("time_to_first_token_seconds", seconds)
        self._first.pending = True

    def on_token(self, n, seconds_since_last):
        if getattr(self._first, "pending", False):
            # the first of these n tokens is the first token (its wait is the TTFT); the rest came with it
            self._first.pending = False
            if n > 1:
                self.seg.observe("inter_token_latency_seconds", 0.0, n - 1)
            return
        n = max(n, 1)       # n tokens that arrived together: n gaps of an n-th of the wait each
        self.seg.observe("inter_token_latency_seconds", seconds_since_last / n, n)

    def on_request_end(self, status, seconds, prompt_tokens, completion_tokens):
        self._first.pending = False
        if 200 <= status < 400:
            self.seg.add("request_success")
            self.seg.observe("e2e_request_latency_seconds", seconds)
        else:
            self.seg.add("request_failure")


def render(stats_by_model):
    """Prometheus text exposition of {model_name: Segment.stats() dict}: each metric
    family once (HELP, TYPE), a sample per model labelled model_name."""
    lines = []
    for stat in ENGINE_STATS + WORKER_STATS:
        models = [(name, stats[stat.name]) for name, stats in stats_by_model.items() if stat.name in stats]
        if not models:
            continue
        full = PREFIX + stat.exported_name
        lines += [f"# HELP {full} {stat.help}", f"# TYPE {full} {stat.kind}"]
        for model_name, value in models:
            lines += _samples(full, stat.kind, f'model_name="{_escape(model_name)}"', value)
    return "\n".join(lines) + "\n"


def _samples(full, kind, label, value):
    if kind != "histogram":
        return [f"{full}{{{label}}} {_number(value)}"]
    lines, cumulative = [], 0
    for bound, count in zip(list(value["buckets"]) + [math.inf], value["counts"]):
        cumulative += count
        lines.append(f'{full}_bucket{{{label},le="{_number(float(bound))}"}} {cumulative}')
    lines.append(f"{full}_sum{{{label}}} {_number(value['sum'])}")
    lines.append(f"{full}_count{{{label}}} {value['count']}")
    return lines


class MetricsResource:
    """/metrics over every served model: [(segment, model_name), ...]."""

    def __init__(self, segments):
        self.segments = segments

    def on_get(self, req, resp):
        resp.content_type = CONTENT_TYPE
        resp.text = render({name: seg.stats() for seg, name in self.segments})


def _number(v):
    if isinstance(v, float):
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        return repr(v)
    return str(v)


def _escape(s):
    return str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
