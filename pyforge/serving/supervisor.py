"""The engine's supervisor: the segment and the engine process, started, watched,
restarted after a crash (within max_engine_restarts per RESTART_WINDOW) and
stopped. `pyforge serve` runs it in the launcher process (pyforge/server/launcher.py),
`gunicorn ... -c gunicorn_conf` in a thread of the arbiter.

The engine process is ENGINE_BOOT, pyforge.serving.engine_process imported from the
installed package; its exit status is read without reaping it first (waitid with
WNOWAIT), so it is known even where gunicorn's arbiter reaps every child.
"""
import json
import logging
import os
import signal
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
        log.info("engine ready: %s (pid %d, segment %s)", self.config.served_model_name, self.proc.pid,
                 self.segment.name)
        if self.config.null_model:
            log.warning("--null-model: the engine skips the forward pass; every reply is one repeated token")

    def _spawn(self, timeout):
        cmd = [sys.executable, "-c", ENGINE_BOOT, self.segment.name,
               json.dumps(EngineConfig.from_server_config(self.config).to_dict()), str(self.config.queue_capacity),
               str(self.config.drain_timeout), self.config.log_level, self.config.log_format,
               self.config.service_name]
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
