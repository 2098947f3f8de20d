"""SGLang's router (the sglang-router wheel: a Rust binary behind a Python launcher)
as a subprocess on loopback, in front of pyforge replicas."""
import json
import signal
import subprocess
import sys
import tempfile
import time

from live_server import free_port, get


class Router:
    def __init__(self, worker_urls, policy="round_robin", ready_timeout=60, flags=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
               "--policy", policy, "--host", "127.0.0.1", "--port", str(self.port),
               "--prometheus-port", str(free_port()),
               # a replica that is not ready (loading, draining, engine restarting) is dropped
               "--health-check-endpoint", "/health/ready", "--health-check-interval-secs", "1",
               "--health-failure-threshold", "1", "--worker-startup-check-interval", "1",
               "--worker-startup-timeout-secs", str(ready_timeout), "--log-level", "warn", *flags]
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while not self._ready():
            assert self.proc.poll() is None, f"the router exited while starting:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"the router did not get ready:\n{self.log()[-3000:]}"
            time.sleep(0.2)
        import openai
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=60)

    def _ready(self):
        try:
            status, body = get(self.url + "/v1/models", 2)
        except OSError:
            return False
        return status == 200 and bool(json.loads(body).get("data"))

    def log(self):
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
