"""Shapes of the model families the specs and the planner know.

The planner sizes weights and KV cache from these numbers, so a spec names an architecture
instead of repeating layer counts (and getting one wrong). Values are the published
Hugging Face ``config.json`` numbers of each model.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    """What sizing needs to know about a decoder-only transformer."""

    name: str
    family: str  # TensorRT-LLM model family, e.g. "llama"
    params_b: float  # parameters, in billions
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def kv_bytes_per_token(self, kv_dtype_bytes: float) -> float:
        """Bytes of K and V cache one token occupies across all layers (whole model)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * kv_dtype_bytes

    def allowed_tp(self) -> list[int]:
        """Tensor-parallel sizes that split the KV heads evenly (the engine requires it)."""
        return [tp for tp in (1, 2, 4, 8) if self.num_kv_heads % tp == 0]


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("llama-3.1-8b", "llama", 8.03, 32, 32, 8, 128, 128256),
        Architecture("llama-3.1-70b", "llama", 70.6, 80, 64, 8, 128, 128256),
        Architecture("llama-3.1-405b", "llama", 405.8, 126, 128, 8, 128, 128256),
        # The seed case of the planner: a 32B dense model (Qwen2.5-32B shape).
        Architecture("dense-32b", "qwen", 32.8, 64, 40, 8, 128, 152064),
        # A tiny random Llama, used by the GPU smoke build and the fake-module tests.
        Architecture("tiny-llama", "llama", 0.0003, 2, 4, 2, 16, 512),
    )
}


def architecture(name: str) -> Architecture:
    """Look up ``name``; the error lists the known ones so the user can fix the spec."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(
            f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
