"""GPU only: build a real engine for a tiny random Llama through ``python -m build_engines``.

Skips cleanly without a GPU or without TensorRT-LLM (``pip install '.[trtllm]'``).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from build_engines.__main__ import main
from build_engines.architectures import architecture
from build_engines.manifest import Manifest


def _gpu_present() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return done.returncode == 0 and "GPU" in done.stdout


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _gpu_present(), reason="needs an NVIDIA GPU (nvidia-smi finds none)"),
    pytest.mark.skipif(
        importlib.util.find_spec("tensorrt_llm") is None,
        reason="needs TensorRT-LLM: pip install '.[trtllm]'",
    ),
]


def _tiny_llama(path: Path) -> None:
    """A randomly initialised Llama of the ``tiny-llama`` shape, saved as a HF checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = architecture("tiny-llama")
    config = LlamaConfig(
        hidden_size=arch.num_attention_heads * arch.head_dim,
        intermediate_size=128,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_kv_heads,
        vocab_size=arch.vocab_size,
        max_position_embeddings=256,
        torch_dtype="float16",
    )
    LlamaForCausalLM(config).save_pretrained(path)


def test_build_a_tiny_random_llama_engine(tmp_path: Path) -> None:
    checkpoint = tmp_path / "tiny-llama-hf"
    _tiny_llama(checkpoint)
    spec = {
        "tier": "llm_tiny",
        "architecture": "tiny-llama",
        "checkpoint": str(checkpoint),
        "dtype": "float16",
        "quantization": "none",
        "parallel": {"tp": 1},
        "limits": {
            "max_batch_size": 4,
            "max_input_len": 64,
            "max_seq_len": 128,
            "max_num_tokens": 256,
        },
        "kv_cache": {"free_gpu_mem_fraction": 0.2},
        "serving": {"target_concurrency": 4, "target_context": 128},
        "triton": {"engine_dir": str(tmp_path / "engine")},
    }
    spec_path = tmp_path / "llm_tiny.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    repo = tmp_path / "model_repository"
    assert main(["build", str(spec_path), "--repository", str(repo)]) == 0
    engine = tmp_path / "engine"
    assert (engine / "rank0.engine").stat().st_size > 0
    manifest = Manifest.read(engine)
    import tensorrt_llm

    assert manifest.tensorrt_llm_version == tensorrt_llm.__version__
    assert (repo / "llm_tiny" / "configs" / "h100.pbtxt").is_file()
