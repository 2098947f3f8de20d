"""`pyforge serve`: segment, engine process, then gunicorn (DESIGN.md, "Processes").

    serve(config) -> exit status

  0. The port is checked first: a busy one is an error before any model loads;
     then the memory budget (serving/memory.py): models whose weights and KV
     pools do not fit the machine's available memory are refused.
  1. Per served model (config.per_model(): --model, or each of --models), a
     segment (Segment.create, after cleanup_stale() of segments whose creator
     died) and an engine process (ENGINE_BOOT: pyforge.serving.engine_process,
     imported from the installed package), waited on until its status is READY;
     if one exits first (a bad model file), a clear error and no server.
  2. gunicorn in a forked child (BaseApplication, GuardedThreadWorker workers).
     Each worker, in post_worker_init, maps every model's segment, claims a slot
     in each (IpcEngineClient), reads each tokenizer from its model file (mmap:
     cheap) and builds the app (build_app + /metrics); it replaces the placeholder.
     A request's `model` picks the engine (server/served.py).
  3. This process supervises each engine (pyforge/serving/supervisor.py): a crashed
     engine is restarted on the same segment (the workers stay up, its model is
     "not ready" in /health/ready meanwhile, queued requests are resubmitted to
     the new engine, running ones get an error); more than max_engine_restarts
     crashes of one engine within RESTART_WINDOW, and the server logs why and
     exits with status 1.

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
import ssl
import sys

from pyforge.ipc.segment import Segment
from pyforge.server import logs, tracing
from pyforge.serving.memory import check_memory
from pyforge.serving.supervisor import EngineRunner, EngineStartError, describe_exit

log = logging.getLogger("pyforge.launcher")


def check_ports(config):
    """OSError now if any of the configured addresses cannot be listened on."""
    for host in config.hosts:
        check_port(host, config.port)


def check_port(host, port):
    """OSError now if host:port cannot be listened on, before a model takes minutes to load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as gunicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None


def check_tls(config):
    """OSError now if https is on and its certificate and key do not load (as every worker will)."""
    if not config.tls:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    except OSError as e:                # ssl.SSLError is one
        raise OSError(f"cannot load the TLS certificate {config.ssl_certfile} with the key "
                      f"{config.ssl_keyfile}: {e}") from None


# -- the worker side -------------------------------------------------------

def build_worker_app(config, runners, limit=None):
    """Everything a worker process serves: (WSGI app, [engine client per model]);
    `limit`: the server's ConcurrencyLimit, made before the fork, or None."""
    from pyforge.server.admission import admitted_app
    from pyforge.server.web import canonical_header_names
    from pyforge.server.app import build_app, serving_context
    from pyforge.server.ipc_client import IpcEngineClient
    from pyforge.server.metrics import MetricsResource, SegmentObserver
    from pyforge.tokenizer import load_tokenizer
    from pyforge.loader import load_model_file

    contexts, clients = [], []
    for runner in runners:
        model_config = runner.config
        with load_model_file(model_config.model) as model_file:
            tokenizer = load_tokenizer(model_file)
        segment = Segment.attach(runner.segment_name)
        client = IpcEngineClient(segment, queue_capacity=model_config.queue_capacity,
                                 timeout=model_config.stall_timeout,
                                 heartbeat_timeout=model_config.engine_heartbeat_timeout)
        clients.append(client)
        contexts.append(serving_context(model_config, client, tokenizer, SegmentObserver(segment)))
    app = build_app(config, contexts, limit)
    app.add_route("/metrics", MetricsResource([(c.seg, ctx.model_name) for c, ctx in zip(clients, contexts)]))
    if limit is not None:
        limit.attach()
        app = admitted_app(app, limit)
    return canonical_header_names(app), clients


def placeholder_app(environ, start_response):
    """The WSGI callable gunicorn loads; post_worker_init swaps in the real app."""
    start_response("503 Service Unavailable", [("Content-Type", "application/json")])
    return [b'{"error": {"message": "the worker is not initialised (run gunicorn with '
            b'-c python:pyforge.server.gunicorn_conf)", "type": "server_error"}}']


# -- gunicorn hooks (shared by `pyforge serve` and gunicorn_conf.py) --------

def on_starting(server):
    """Arbiter, before any worker: the engine, unless the launcher started it."""
    app = server.app
    if getattr(app, "engine_runners", None) is not None:
        return                          # `pyforge serve`: the launcher process supervises the engines
    from pyforge.config import ServerConfig
    app.pyforge_config = ServerConfig.from_sources(None)
    _configure_logging(app.pyforge_config, warn=False)     # gunicorn_conf warned when it was read
    check_ports(app.pyforge_config)
    check_tls(app.pyforge_config)
    tracing.require(app.pyforge_config)
    check_memory(app.pyforge_config.per_model())
    app.pyforge_limit = concurrency_limit(app.pyforge_config)
    app.engine_runners = start_engines(app.pyforge_config)
    for runner in app.engine_runners:   # the arbiter's graceful stop, as if from outside
        runner.supervise(lambda: os.kill(os.getpid(), signal.SIGTERM))


def post_worker_init(worker):
    app = worker.app
    worker.pyforge_tracing = tracing.start(app.pyforge_config)     # after the fork: its export thread lives here
    worker.wsgi, worker.pyforge_clients = build_worker_app(app.pyforge_config, app.engine_runners,
                                                           app.pyforge_limit)


def child_exit(server, worker):
    """Arbiter: a worker is gone; the requests it held are not in flight any more."""
    limit = getattr(server.app, "pyforge_limit", None)
    if limit is not None:
        limit.release_worker(worker.pid)


def worker_exit(server, worker):
    for client in getattr(worker, "pyforge_clients", ()):
        client.close()
        client.seg.close()
    if getattr(worker, "pyforge_tracing", None) is not None:
        worker.pyforge_tracing.shutdown()      # export the spans still queued


def on_exit(server):
    runners = getattr(server.app, "engine_runners", None) or ()
    stop_engines(runners)
    if any(runner.gave_up for runner in runners):
        raise SystemExit(1)             # gunicorn's own exit would say 0


def gunicorn_settings(config):
    return {
        "bind": [f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}" for host in config.hosts],
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
        "logger_class": logs.gunicorn_logger_class,    # gunicorn's lines in our format (called by gunicorn)
        "child_exit": child_exit,
        "on_exit": on_exit,
        # https: GuardedThreadWorker does the handshakes; gunicorn logs "Listening at: https://..."
        **({"certfile": config.ssl_certfile, "keyfile": config.ssl_keyfile} if config.tls else {}),
    }


def _application_class():
    from gunicorn.app.base import BaseApplication

    class PyforgeApplication(BaseApplication):
        def __init__(self, config, runners):
            self.pyforge_config = config
            self.engine_runners = runners
            self.pyforge_limit = concurrency_limit(config)     # shared memory, before gunicorn forks
            super().__init__()

        def load_config(self):
            for key, value in gunicorn_settings(self.pyforge_config).items():
                self.cfg.set(key, value)

        def load(self):
            return placeholder_app

    return PyforgeApplication


def _configure_logging(config, warn=True):
    """Also gunicorn's arbiter and workers: forked from here, they keep this setup.
    The environment's unknown LLM_* names are warned about here, in the chosen format."""
    from pyforge.config import warn_unknown_env
    logs.configure(config.log_level, config.log_format, config.service_name)
    if warn:
        warn_unknown_env()


def concurrency_limit(config):
    from pyforge.server.admission import ConcurrencyLimit
    return ConcurrencyLimit(config.max_concurrent_requests) if config.max_concurrent_requests else None


def start_engines(config):
    """An EngineRunner per served model, each started (READY); on a failure the
    ones already started are stopped and EngineStartError raised."""
    runners = []
    try:
        for model_config in config.per_model():
            runners.append(EngineRunner(model_config))
            runners[-1].start()
    except BaseException:
        stop_engines(runners)
        raise
    return runners


def stop_engines(runners):
    for runner in runners:
        runner.stop()


def serve(config):
    """Run the server until it is stopped; returns the exit status. gunicorn runs in a
    child process, so this one alone waits on the engines (the arbiter reaps every
    child it has) and restarts one when it crashes."""
    _configure_logging(config)
    try:
        check_ports(config)
        check_tls(config)
        tracing.require(config)
        check_memory(config.per_model())
        runners = start_engines(config)
    except (OSError, ValueError, EngineStartError) as e:
        log.error("%s", e)
        return 1
    try:
        arbiter = _fork_gunicorn(config, runners)
        for runner in runners:
            runner.supervise(lambda: os.kill(arbiter, signal.SIGTERM))
        status = _wait_for_gunicorn(arbiter)
    finally:
        stop_engines(runners)
    return 1 if any(runner.gave_up for runner in runners) else status


def _fork_gunicorn(config, runners):
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _die_with_parent(parent)
        _application_class()(config, runners).run()
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
