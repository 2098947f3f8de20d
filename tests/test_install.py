"""The README's quick start as a newcomer runs it: a wheel of this checkout
installed non-editable into a fresh virtual environment, the README's serve
command run from the repository folder (where the source tree, with no
compiled modules, comes first on sys.path) and from another folder, and the
README's curl answered each time; gunicorn with the installed config too.

The commands are read from the README itself, so the README stays true. The
fresh environment takes its dependencies from the package index (pip's cache
makes that quick after CI's own install)."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import venv

import pytest

from live_server import REPO, free_port, get
from pyforge.server.playground import FILES as PLAYGROUND_FILES

README = (REPO / "README.md").read_text()


def readme_command(start):
    """The first command of a README bash block that begins with `start` (a
    command continued with backslashes is joined)."""
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        command = block.replace("\\\n", " ").strip()
        if command.startswith(start):
            return command
    raise AssertionError(f"the README has no bash block starting with {start!r}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """bin/ of a fresh venv holding this checkout's wheel, installed non-editable."""
    root = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root / "dist"), str(REPO)],
                   check=True, timeout=900)
    [wheel] = (root / "dist").glob("pyforge-*.whl")
    venv.create(root / "venv", with_pip=True)
    bin_dir = root / "venv" / "bin"
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=900)
    return bin_dir


def serve_readme(bin_dir, cwd, port, model=None):
    """The README's serve command (the part after `pip install . &&`) on `port`."""
    command = readme_command("pip install .").split("&&", 1)[1]
    args = shlex.split(command.replace("--port 8000", f"--port {port}"))
    assert args[:2] == ["pyforge", "serve"], command
    if model is not None:
        args[args.index("--model") + 1] = model
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    return start(args, cwd, env)


def readme_curl(port):
    command = readme_command("curl").replace("localhost:8000", f"localhost:{port}")
    out = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def start(args, cwd, env):
    """The process, its stderr kept in `proc.log` (a pipe nobody reads would stall it)."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stderr=log)
    proc.log = log
    return proc


def wait_ready(proc, port, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            proc.log.seek(0)
            raise AssertionError(f"the server exited ({proc.returncode}): {proc.log.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, "the server did not get ready"
        try:
            if get(f"http://127.0.0.1:{port}/health/ready", 1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def stories_model():
    path = REPO.parent / "shared" / "models" / "stories260K" / "stories260K.gguf"
    if not path.exists():
        pytest.skip(f"{path} is not there (../shared/models)")
    return path


@pytest.mark.parametrize("where", ["repository folder", "another folder"])
def test_the_readme_quick_start_works_from_a_non_editable_install(installed, tmp_path, where):
    model = stories_model()
    port = free_port()
    cwd, path = (REPO, None) if where == "repository folder" else (tmp_path, str(model))
    proc = serve_readme(installed, cwd, port, path)
    try:
        wait_ready(proc, port)
        reply = readme_curl(port)
        assert reply["choices"][0]["text"] and reply["usage"]["completion_tokens"] == 40
        # the playground's files are package data: the wheel serves them too
        assert {path: get(f"http://127.0.0.1:{port}{path}")[0] for path in PLAYGROUND_FILES} == \
            dict.fromkeys(PLAYGROUND_FILES, 200)
    finally:
        stop(proc)


@pytest.mark.parametrize("where, app, conf", [
    ("repository folder", "wsgi:app", "pyforge/server/gunicorn_conf.py"),
    ("another folder", "pyforge.wsgi:app", "python:pyforge.server.gunicorn_conf"),
])
def test_gunicorn_runs_the_installed_package(installed, tmp_path, where, app, conf):
    port = free_port()
    env = {**os.environ, "LLM_MODEL": str(stories_model()), "LLM_PORT": str(port), "LLM_WORKERS": "1"}
    env.pop("PYTHONPATH", None)
    proc = start([installed / "gunicorn", app, "-c", conf], REPO if where == "repository folder" else tmp_path, env)
    try:
        wait_ready(proc, port)
        assert readme_curl(port)["usage"]["completion_tokens"] == 40
    finally:
        stop(proc)


def test_the_checkout_finds_the_installed_compiled_modules(installed, tmp_path):
    """`python -m pytest` or `python -c` in the repository folder import the source
    tree first; its compiled modules come from the installed package. (A copy of the
    tree without compiled modules stands in for a fresh clone.)"""
    shutil.copytree(REPO / "pyforge", tmp_path / "pyforge", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([installed / "python", "-c", "import pyforge, pyforge.native.block_pool as m; "
                          "print(pyforge.__path__[0]); print(m.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    package, module = out.stdout.split()
    assert package == str(tmp_path / "pyforge") and module.startswith(str(installed.parent))
