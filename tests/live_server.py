"""A real `pyforge serve` for tests: the launcher as a subprocess, gunicorn really
serving, the engine a real process; helpers to read it over plain HTTP."""
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHM = "/dev/shm"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid):
    """Pids of every live process under `pid`."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def children(pid):
    return [p for p in descendants(pid) if _parent(p) == pid]


def _parent(pid):
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def get(url, timeout=5, context=None):
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Server:
    def __init__(self, model_path, *flags, workers=2, env=None, ready_timeout=30, ca=None):
        """model_path None: the flags (or env) name the models. ca: the file of the CA that
        signed the server's certificate (the flags set https); `tls` trusts it."""
        self.port = free_port()
        model = ["--model", model_path] if model_path is not None else []
        cmd = [sys.executable, "-m", "pyforge.cli", "serve", *model, "--port", str(self.port),
               "--workers", str(workers), "--worker-threads", "40", "--threads", "1",
               "--max-model-len", "2048", "--kv-cache-tokens", "16384", "--max-num-seqs", "32",
               "--drain-timeout", "20", "--log-level", "warning", *flags]
        env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stderr=self._log)
        self.tls = ssl.create_default_context(cafile=ca) if ca else None
        self.url = f"{'https' if ca else 'http'}://127.0.0.1:{self.port}"
        deadline = time.monotonic() + ready_timeout
        while True:
            assert self.proc.poll() is None, f"the server exited while starting:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, "the server did not get ready"
            try:
                if get(self.url + "/health/ready", 1, self.tls)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        self.pids = descendants(self.proc.pid)
        import openai
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0,
                                    http_client=openai.DefaultHttpxClient(verify=self.tls) if ca else None)

    def pids_now(self):
        """Every live process of the server now (remembered for assert_clean)."""
        now = descendants(self.proc.pid)
        self.pids = sorted(set(self.pids) | set(now))
        return now

    def workers(self):
        """The gunicorn workers: the children of the launcher's child that is not the engine."""
        arbiter = [p for p in children(self.proc.pid) if b"engine_process" not in _cmdline(p).encode()]
        return [w for a in arbiter for w in children(a)]

    def log(self):
        """What the server wrote to stderr so far."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def segments(self):
        return [n for n in os.listdir(SHM) if n.startswith(f"pyforge-{self.proc.pid}-")]

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code

    def assert_clean(self, grace=5.0):
        # multiprocessing's resource tracker sees its pipe close only after the launcher exits: a moment later
        deadline = time.monotonic() + grace
        while (alive := [p for p in self.pids if os.path.exists(f"/proc/{p}") and _not_zombie(p)]) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive == [], f"processes left behind: {[(p, _cmdline(p)) for p in alive]}"
        assert self.segments() == []


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def _not_zombie(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def metric(text, name):
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def wait_for_metrics(server, done, timeout=10.0):
    """Poll /metrics until done(text) or the timeout; the last text either way."""
    deadline = time.monotonic() + timeout
    while True:
        text = get(server.url + "/metrics")[1]
        if done(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def read_sse_events(sock, n):
    """Read from a raw socket until n `data:` events have arrived; the bytes read."""
    data = b""
    while data.count(b"\ndata:") + data.startswith(b"data:") < n:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the stream early"
        data += chunk
    return data


def post(url, body, timeout=10):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
