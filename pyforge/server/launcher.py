"""`pyforge serve`: segment, engine process, then gunicorn (DESIGN.md, "Processes").

    serve(config) -> exit status

  0. The port is checked first: a busy one is an error before any model loads.
  1. Segment.create (after cleanup_stale() of segments whose creator died).
  2. The engine process (ENGINE_BOOT: pyforge.serving.engine_process, imported
     from the installed package), waited on until its status is READY; if it
     exits first (a bad model file), a clear error and no server.
  3. gunicorn in a forked child (BaseApplication, GuardedThreadWorker workers).
     Each worker, in post_worker_init, maps the segment, claims a slot
     (IpcEngineClient), reads the tokenizer from the model file (mmap: cheap)
     and builds the app (create_app + /metrics); it replaces the placeholder.
  4. This process supervises (pyforge/serving/supervisor.py): a crashed engine is restarted on the same
     segment (the workers stay up, /health/ready is 503 meanwhile, queued
     requests are resubmitted to the new engine, running ones get an error);
     more than max_engine_restarts crashes within RESTART_WINDOW, and the
     server logs why and exits with status 1.

`gunicorn wsgi:app -c pyforge/server/gunicorn_conf.py` (or, from anywhere,
`gunicorn pyforge.wsgi:app -c python:pyforge.server.gunicorn_conf`) runs the
same hooks: on_starting makes the segment and engine from the LLM_*
environment and supervises it from a thread of the arbiter.

Shutdown: SIGTERM (forwarded to the arbiter) makes gunicorn stop accepting and
give in-flight requests `drain_timeout` seconds; then the engine is stopped
(SIGTERM: it drains too) and the segment unlinked. An engine stopped from
outside in an orderly way (SIGTERM to it) shuts the server down the same way.
"""
import logging
import math
import os
import signal
import socket
import sys

from pyforge.ipc.segment import Segment
from pyforge.serving.supervisor import EngineRunner, EngineStartError, describe_exit

log = logging.getLogger("pyforge.launcher")


def check_port(host, port):
    """OSError now if host:port cannot be listened on, before a model takes minutes to load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as gunicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None


# -- the worker side -------------------------------------------------------

def build_worker_app(config, segment_name):
    """Everything a worker process serves: (falcon app, engine client)."""
    from pyforge.tokenizer import load_tokenizer
    from pyforge.loader import load_model_file
    from pyforge.server.app import create_app
    from pyforge.server.ipc_client import IpcEngineClient
    from pyforge.server.metrics import MetricsResource, SegmentObserver

    tokenizer = load_tokenizer(load_model_file(config.model))
    segment = Segment.attach(segment_name)
    client = IpcEngineClient(segment, queue_capacity=config.queue_capacity, timeout=config.stall_timeout,
                             heartbeat_timeout=config.engine_heartbeat_timeout)
    app = create_app(config, client, tokenizer, SegmentObserver(segment))
    app.add_route("/metrics", MetricsResource(segment, config.served_model_name))
    return app, client


def placeholder_app(environ, start_response):
    """The WSGI callable gunicorn loads; post_worker_init swaps in the real app."""
    start_response("503 Service Unavailable", [("Content-Type", "application/json")])
    return [b'{"error": {"message": "the worker is not initialised (run gunicorn with '
            b'-c python:pyforge.server.gunicorn_conf)", "type": "server_error"}}']


# -- gunicorn hooks (shared by `pyforge serve` and gunicorn_conf.py) --------

def on_starting(server):
    """Arbiter, before any worker: the engine, unless the launcher started it."""
    app = server.app
    if getattr(app, "engine_runner", None) is not None:
        return                          # `pyforge serve`: the launcher process supervises the engine
    from pyforge.config import ServerConfig
    app.pyforge_config = ServerConfig.from_sources(None)
    _configure_logging(app.pyforge_config)
    check_port(app.pyforge_config.host, app.pyforge_config.port)
    app.engine_runner = EngineRunner(app.pyforge_config)
    app.engine_runner.start()
    # the arbiter's graceful stop, as if from outside
    app.engine_runner.supervise(lambda: os.kill(os.getpid(), signal.SIGTERM))


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
        if runner.gave_up:
            raise SystemExit(1)         # gunicorn's own exit would say 0


def gunicorn_settings(config):
    return {
        "bind": [f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"],
        "workers": config.workers,
        "threads": config.worker_threads,
        "worker_class": "pyforge.server.worker.GuardedThreadWorker",
        "worker_connections": config.worker_connections,
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
    """Run the server until it is stopped; returns the exit status. gunicorn runs in a
    child process, so this one alone waits on the engine (the arbiter reaps every
    child it has) and restarts it when it crashes."""
    _configure_logging(config)
    try:
        check_port(config.host, config.port)
    except OSError as e:
        log.error("%s", e)
        return 1
    runner = EngineRunner(config)
    try:
        runner.start()
    except EngineStartError as e:
        log.error("%s", e)
        return 1
    try:
        arbiter = _fork_gunicorn(config, runner)
        runner.supervise(lambda: os.kill(arbiter, signal.SIGTERM))
        status = _wait_for_gunicorn(arbiter)
    finally:
        runner.stop()
    return 1 if runner.gave_up else status


def _fork_gunicorn(config, runner):
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _die_with_parent(parent)
        _application_class()(config, runner).run()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        log.exception("gunicorn failed")
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait_for_gunicorn(pid):
    """Forward stop signals to gunicorn's arbiter and wait for it; its exit status."""
    def forward(signum, frame):
        try:
            os.kill(pid, signal.SIGTERM if signum == signal.SIGTERM else signum)
        except ProcessLookupError:
            pass
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, forward)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        log.error("gunicorn's arbiter (pid %d) died (%s)", pid, describe_exit(code))
        return 1
    return code


def _die_with_parent(parent):
    """The arbiter gets SIGTERM if the launcher dies (Linux), so a killed launcher
    leaves no server behind; the engine watches its parent the same way."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)       # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:         # it died before the request took effect
        os._exit(1)
