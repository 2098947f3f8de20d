"""`pyforge serve`: segment, engine process, then gunicorn (DESIGN.md, "Processes").

    serve(config) -> exit status

  1. Segment.create (after cleanup_stale() of segments whose creator died).
  2. The engine process (`python -m pyforge.server.engine_process`), waited on
     until its status is READY; if it exits first (a bad model file), a clear
     error and no server.
  3. gunicorn in this process (BaseApplication, gthread workers). Each worker,
     in post_worker_init, maps the segment, claims a slot (IpcEngineClient),
     reads the tokenizer from the model file (mmap: cheap) and builds the app
     (create_app + /metrics); it replaces the placeholder WSGI callable.

`gunicorn wsgi:app -c pyforge/server/gunicorn_conf.py` runs the same hooks:
on_starting makes the segment and engine from the LLM_* environment.

Shutdown: SIGTERM makes gunicorn stop accepting and give in-flight requests
`drain_timeout` seconds; on_exit then stops the engine (SIGTERM: it drains
too) and unlinks the segment. If the engine process dies, /health/ready turns
503 at once and, ENGINE_LOSS_GRACE seconds later, the server shuts down the
same way and exits with status 1.
"""
import json
import math
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from pyforge.ipc.segment import EngineStatus, Segment, cleanup_stale

log = logging.getLogger("pyforge.launcher")

LOAD_TIMEOUT = 600.0        # seconds the engine may take to load the model
ENGINE_LOSS_GRACE = 2.0     # seconds between losing the engine and shutting down
STOP_GRACE = 5.0            # seconds past drain_timeout before the engine is killed


class EngineStartError(RuntimeError):
    pass


def engine_kwargs(config):
    return {"model_path": config.model, "device": config.device, "n_threads": config.threads,
            "max_model_len": config.max_model_len, "kv_cache_tokens": config.kv_cache_tokens,
            "block_size": config.block_size, "max_num_seqs": config.max_num_seqs,
            "max_num_batched_tokens": config.max_num_batched_tokens, "null_model": config.null_model,
            "gpu_memory_utilization": config.gpu_memory_utilization, "cuda_graphs": config.cuda_graphs}


class EngineRunner:
    """The segment and the engine process: start, watch, stop (idempotent)."""

    def __init__(self, config):
        self.config = config
        self.segment = None
        self.proc = None
        self.engine_lost = False
        self._stopping = False
        self._owner = os.getpid()     # gunicorn's forked workers inherit this object: only we stop it

    @property
    def segment_name(self):
        return self.segment.name

    def start(self, timeout=LOAD_TIMEOUT):
        cleanup_stale()
        # gunicorn may briefly run a replacement next to a dying worker: room for both
        self.segment = Segment.create(n_workers=2 * self.config.workers + 2)
        cmd = [sys.executable, "-m", "pyforge.server.engine_process", self.segment.name,
               json.dumps(engine_kwargs(self.config)), str(self.config.queue_capacity),
               str(self.config.drain_timeout), self.config.log_level]
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("engine ready (pid %d, segment %s)", self.proc.pid, self.segment.name)
        if self.config.null_model:
            log.warning("--null-model: the engine skips the forward pass; every reply is one repeated token")

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while self.segment.engine_status != EngineStatus.READY:
            code = self.proc.poll()
            if code is not None:
                raise EngineStartError(f"the engine process exited with status {code} while loading "
                                       f"{self.config.model} (its error is logged above)")
            if time.monotonic() > deadline:
                raise EngineStartError(f"the engine did not load {self.config.model} within {timeout:g} s")
            time.sleep(0.05)

    def watch(self, on_lost):
        """Call on_lost() (from a thread) if the engine exits while we are not stopping it."""
        def wait():
            while self.proc.poll() is None and not self._stopping:
                if self.segment.engine_status == EngineStatus.STOPPED:
                    break
                time.sleep(0.2)
            if self._stopping:
                return
            code = self.proc.poll()     # 0 also when gunicorn's SIGCHLD handler reaped it first
            if self.segment.engine_status == EngineStatus.STOPPED:
                log.warning("the engine process (pid %d) was stopped from outside; shutting down", self.proc.pid)
            else:
                self.engine_lost = True
                log.error("the engine process (pid %d) died (status %s)", self.proc.pid, code)
            on_lost()
        threading.Thread(target=wait, name="pyforge-engine-watch", daemon=True).start()

    def stop(self):
        if self._stopping or os.getpid() != self._owner:
            return
        self._stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.config.drain_timeout + STOP_GRACE)
            except subprocess.TimeoutExpired:
                log.error("the engine did not stop in time; killing it")
                self.proc.kill()
                self.proc.wait()
        _reap(self.proc)
        if self.segment is not None:
            name = self.segment.name
            self.segment.close()
            try:
                self.segment.unlink()
            except FileNotFoundError:
                pass
            log.info("engine stopped; segment %s removed", name)


def _reap(proc):
    """Reap the engine even if gunicorn's SIGCHLD handler got there first."""
    if proc is not None:
        try:
            proc.wait(0)
        except (subprocess.TimeoutExpired, ChildProcessError):
            pass


# -- the worker side -------------------------------------------------------

def build_worker_app(config, segment_name):
    """Everything a worker process serves: (falcon app, engine client)."""
    from pyforge.engine.engine import load_tokenizer
    from pyforge.loader import load_model_file
    from pyforge.server.app import create_app
    from pyforge.server.ipc_client import IpcEngineClient
    from pyforge.server.metrics import MetricsResource, SegmentObserver

    model_file = load_model_file(config.model)
    tokenizer = load_tokenizer(model_file)
    context = model_file.config.context_length
    max_model_len = min(config.max_model_len or context, context)    # as Engine computes it
    segment = Segment.attach(segment_name)
    client = IpcEngineClient(segment, max_model_len, vocab_size=model_file.config.vocab_size,
                             queue_capacity=config.queue_capacity, timeout=config.stall_timeout)
    app = create_app(config, client, tokenizer, SegmentObserver(segment))
    app.add_route("/metrics", MetricsResource(segment, config.served_model_name))
    return app, client


def placeholder_app(environ, start_response):
    """The WSGI callable gunicorn loads; post_worker_init swaps in the real app."""
    start_response("503 Service Unavailable", [("Content-Type", "application/json")])
    return [b'{"error": {"message": "the worker is not initialised (run gunicorn with '
            b'-c pyforge/server/gunicorn_conf.py)", "type": "server_error"}}']


# -- gunicorn hooks (shared by `pyforge serve` and gunicorn_conf.py) --------

def on_starting(server):
    """Arbiter, before any worker: the engine, unless the launcher started it."""
    app = server.app
    if getattr(app, "engine_runner", None) is None:
        from pyforge.config import ServerConfig
        app.pyforge_config = ServerConfig.from_sources(None)
        _configure_logging(app.pyforge_config)
        app.engine_runner = EngineRunner(app.pyforge_config)
        app.engine_runner.start()
    app.engine_runner.watch(lambda: _shutdown_after(ENGINE_LOSS_GRACE))


def post_worker_init(worker):
    app = worker.app
    worker.wsgi, worker.pyforge_client = build_worker_app(app.pyforge_config, app.engine_runner.segment_name)


def worker_exit(server, worker):
    client = getattr(worker, "pyforge_client", None)
    if client is not None:
        client.close()
        client.seg.close()


def on_exit(server):
    runner = getattr(server.app, "engine_runner", None)
    if runner is not None:
        runner.stop()


def _shutdown_after(seconds):
    time.sleep(seconds)
    os.kill(os.getpid(), signal.SIGTERM)     # the arbiter's graceful stop, as if from outside


def gunicorn_settings(config):
    return {
        "bind": [f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"],
        "workers": config.workers,
        "threads": config.worker_threads,
        "worker_class": "gthread",
        "graceful_timeout": max(1, math.ceil(config.drain_timeout)),
        "timeout": 60,
        "keepalive": 5,
        "loglevel": config.log_level,
        "proc_name": "pyforge",
        "control_socket_disable": True,
        "on_starting": on_starting,
        "post_worker_init": post_worker_init,
        "worker_exit": worker_exit,
        "on_exit": on_exit,
    }


def _application_class():
    from gunicorn.app.base import BaseApplication

    class PyforgeApplication(BaseApplication):
        def __init__(self, config, runner):
            self.pyforge_config = config
            self.engine_runner = runner
            super().__init__()

        def load_config(self):
            for key, value in gunicorn_settings(self.pyforge_config).items():
                self.cfg.set(key, value)

        def load(self):
            return placeholder_app

    return PyforgeApplication


def _configure_logging(config):
    logging.basicConfig(level=getattr(logging, config.log_level.upper()),
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")


def serve(config):
    """Run the server until it is stopped; returns the exit status."""
    _configure_logging(config)
    runner = EngineRunner(config)
    try:
        runner.start()
    except EngineStartError as e:
        log.error("%s", e)
        return 1
    status = 0
    try:
        _application_class()(config, runner).run()
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        runner.stop()
    return 1 if runner.engine_lost else status
