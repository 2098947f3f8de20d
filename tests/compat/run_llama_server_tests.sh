#!/usr/bin/env bash
# llama.cpp's own server tests (OpenAI surface) against `pyforge serve`, unchanged:
#   tests/compat/run_llama_server_tests.sh [pytest args]
# Fetches llama.cpp's tree from llama-cpp-python's source distribution (PyPI) into
# $LLAMA_CPP_SDIST_DIR (default /tmp/llama-cpp-sdist), installs the tests' Python
# requirements into the active environment and runs the selection below, with
# tests/compat/pyforge_as_llama_server.py standing in for the llama-server binary.
# Not part of CI: it needs the sdist download and takes several minutes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${LLAMA_CPP_SDIST_DIR:-/tmp/llama-cpp-sdist}"
version=0.3.36
tree="$dir/llama_cpp_python-$version/vendor/llama.cpp/tools/server/tests"
if [ ! -d "$tree" ]; then
  mkdir -p "$dir"
  python -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$dir"
  tar xzf "$dir/llama_cpp_python-$version.tar.gz" -C "$dir"
fi
python -m pip install -q requests wget prometheus-client
cd "$tree"
export LLAMA_SERVER_BIN_PATH="$here/pyforge_as_llama_server.py"
export PYTHONPATH="$here/../..${PYTHONPATH:+:$PYTHONPATH}"
# The OpenAI surface: health and models, completions, chat completions, streaming,
# tools, security (API key, CORS), metrics, tokenize, the Responses API.
exec python -m pytest -q -p no:cacheprovider \
  unit/test_basic.py unit/test_completion.py unit/test_chat_completion.py unit/test_stream.py \
  unit/test_ignore_eos.py unit/test_tool_call.py unit/test_security.py unit/test_metrics.py \
  unit/test_tokenize.py unit/test_compat_oai_responses.py unit/test_compat_anthropic.py "$@"
