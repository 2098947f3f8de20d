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
  4. This process supervises: a crashed engine is restarted on the same
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
import json
import math
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque

from pyforge.engine.config import EngineConfig
from pyforge.ipc.segment import EngineStatus, Segment, cleanup_stale

log = logging.getLogger("pyforge.launcher")

LOAD_TIMEOUT = 600.0        # seconds the engine may take to load the model
STOP_GRACE = 5.0            # seconds past drain_timeout before the engine is killed
RESTART_WINDOW = 600.0      # seconds over which engine crashes are counted against max_engine_restarts
WATCH_EVERY = 0.05          # seconds between looks at the engine process
# The engine runs the installed pyforge: `python -m` and `-c` put the current folder
# first on sys.path, where a checkout's source tree (no compiled modules) would win.
ENGINE_BOOT = ("import sys; sys.path.pop(0); "
               "from pyforge.serving.engine_process import main; main(sys.argv[1:])")


class EngineStartError(RuntimeError):
    pass


def describe_exit(code):
    """A process's exit as words: "status 3", "killed by SIGKILL", or "status unknown"."""
    if code is None:
        return "status unknown (reaped by another waiter)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"status {code}"


class EngineRunner:
    """The segment and the engine process: start, supervise (restart on a crash,
    within max_engine_restarts per RESTART_WINDOW), stop. Idempotent stop."""

    def __init__(self, config):
        self.config = config
        self.segment = None
        self.proc = None
        self.gave_up = False            # the engine crashed more often than we restart it
        self.restart_times = []         # seconds each restart took, until READY
        self._crashes = deque()
        self._stopping = False
        self._owner = os.getpid()     # gunicorn's forked workers inherit this object: only we stop it

    @property
    def segment_name(self):
        return self.segment.name

    def start(self, timeout=LOAD_TIMEOUT):
        removed = cleanup_stale()
        if removed:
            log.info("removed %d shared-memory segment(s) of dead servers: %s", len(removed), ", ".join(removed))
        # gunicorn may briefly run a replacement next to a dying worker: room for both
        self.segment = Segment.create(n_workers=2 * self.config.workers + 2)
        try:
            self._spawn(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("engine ready (pid %d, segment %s)", self.proc.pid, self.segment.name)
        if self.config.null_model:
            log.warning("--null-model: the engine skips the forward pass; every reply is one repeated token")

    def _spawn(self, timeout):
        cmd = [sys.executable, "-c", ENGINE_BOOT, self.segment.name,
               json.dumps(EngineConfig.from_server_config(self.config).to_dict()), str(self.config.queue_capacity),
               str(self.config.drain_timeout), self.config.log_level]
        self.segment.engine_pid = 0
        self.segment.engine_status = EngineStatus.STARTING
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while self.segment.engine_status != EngineStatus.READY:
            code = self.proc.poll()
            if code is not None:
                raise EngineStartError(f"the engine process exited ({describe_exit(code)}) while loading "
                                       f"{self.config.model} (its error is logged above)")
            if self._stopping:
                raise EngineStartError("the server is stopping")
            if time.monotonic() > deadline:
                raise EngineStartError(f"the engine did not load {self.config.model} within {timeout:g} s")
            time.sleep(0.05)

    # -- supervision ------------------------------------------------------------
    def supervise(self, on_end):
        """Watch the engine from a thread: restart it when it crashes; call on_end()
        when it stopped in an orderly way from outside, or crashed once too often."""
        threading.Thread(target=self._supervise, args=(on_end,), name="pyforge-engine-watch", daemon=True).start()

    def _supervise(self, on_end):
        while not self._stopping:
            code = _exit_code(self.proc)
            if code is False or self._stopping:
                time.sleep(WATCH_EVERY)
                continue
            if self.segment.engine_status == EngineStatus.STOPPED:
                log.warning("the engine process (pid %d) was stopped from outside; shutting down", self.proc.pid)
                return on_end()
            log.error("the engine process (pid %d) died (%s)", self.proc.pid, describe_exit(code))
            if not self._restart():
                self.gave_up = True
                return on_end()

    def _restart(self):
        """Start a new engine on the same segment (the workers wait for it); False
        once crashes within RESTART_WINDOW pass max_engine_restarts."""
        while not self._stopping:
            now = time.monotonic()
            self._crashes.append(now)
            while self._crashes and self._crashes[0] < now - RESTART_WINDOW:
                self._crashes.popleft()
            if len(self._crashes) > self.config.max_engine_restarts:
                log.critical("the engine crashed %d times within %g s (max_engine_restarts=%d); giving up",
                             len(self._crashes), RESTART_WINDOW, self.config.max_engine_restarts)
                return False
            log.warning("restarting the engine (crash %d of at most %d within %g s)", len(self._crashes),
                        self.config.max_engine_restarts, RESTART_WINDOW)
            start = time.monotonic()
            try:
                self._spawn(LOAD_TIMEOUT)
            except EngineStartError as e:
                log.error("%s", e)
                if self.proc.poll() is None:
                    self.proc.kill()
                _reap(self.proc)
                time.sleep(min(0.5 * len(self._crashes), 5.0))
                continue
            self.restart_times.append(time.monotonic() - start)
            log.info("engine restarted (pid %d) in %.1f s", self.proc.pid, self.restart_times[-1])
            return True
        return True

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


def _exit_code(proc):
    """The process's exit code once it ended (negative: the signal), False while it
    runs, None if someone else reaped it first. Looks without reaping (WNOWAIT),
    so the status is read even where gunicorn's arbiter reaps every child."""
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return proc.returncode
    if info is None or not info.si_pid:
        return False
    _reap(proc)
    return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status


def _reap(proc):
    """Reap the engine even if gunicorn's SIGCHLD handler got there first."""
    if proc is not None:
        try:
            proc.wait(0)
        except (subprocess.TimeoutExpired, ChildProcessError):
            pass


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
    facts = segment.facts           # what the engine decided: the workers do not recompute it
    client = IpcEngineClient(segment, facts["max_model_len"], vocab_size=facts["vocab_size"],
                             queue_capacity=config.queue_capacity, timeout=config.stall_timeout,
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
