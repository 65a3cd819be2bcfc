"""Which TensorRT-LLM each NGC ``tritonserver:<yy.mm>-trtllm-python-py3`` image bundles.

Engines load only in the TensorRT-LLM that built them, so the image tag and the project's
pin (the ``trtllm`` extra in pyproject.toml) must agree. The rows are from NVIDIA's Triton
release notes as quoted in issue 12 (26.02 ships 1.1.0; 26.04 to 26.07 ship 1.2.1); they
were not re-read here (no network). Add a row before moving the tag; the unit test fails
when docker/Dockerfile.trtllm's default tag maps to another version than the pin, and the
image build itself checks the bundled version.
"""

from __future__ import annotations

from serving.errors import ConfigError

BUNDLED_TRTLLM = {
    "26.02": "1.1.0",
    "26.04": "1.2.1",
    "26.05": "1.2.1",
    "26.06": "1.2.1",
    "26.07": "1.2.1",
}


def bundled_trtllm(triton_tag: str) -> str:
    try:
        return BUNDLED_TRTLLM[triton_tag]
    except KeyError:
        raise ConfigError(
            f"no record of the TensorRT-LLM bundled in Triton {triton_tag}: add it to "
            "build_engines/releases.py from NVIDIA's release notes"
        ) from None
