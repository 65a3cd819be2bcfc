"""A lean Llama forward pass over a slot-based KV cache, for in-flight batching on CPU.

Why not ``model.generate``: it pads a static batch, rebuilds masks and caches through
several layers of Python on every step, and cannot let sequences join or leave between
steps. This runner keeps the weights from the transformers model (fused into three
matmuls per layer) and one preallocated cache per layer of shape
``[max_active, kv_heads, max_context, head_dim]``. Active sequences always occupy slots
``0..n-1`` (a leaving sequence is replaced by the last one), so one decode step is a
single batched forward over contiguous views: no gather, no padding of the weights' work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

#: How many cache positions ahead of the longest sequence are zeroed at once.
_CLEAN_AHEAD = 64


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions the runner needs from a Llama config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float
    rms_eps: float

    @classmethod
    def from_config(cls, config: Any) -> LlamaShape:
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope type {rope.get('rope_type')!r} is not supported")
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            rope_theta=float(theta),
            rms_eps=float(config.rms_norm_eps),
        )


@dataclass
class _Layer:
    norm1: torch.Tensor
    qkv: torch.Tensor  # [q + k + v, hidden]
    out: torch.Tensor
    norm2: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor


def load_hf_model(gguf_path: Path) -> Any:
    """Load the transformers model from a GGUF file beside its package (never a hub)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


class LlamaRunner:
    """Prefill one prompt into a slot, decode one token for every active slot at once."""

    def __init__(
        self,
        hf_model: Any,
        max_active: int,
        max_context: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.shape = LlamaShape.from_config(hf_model.config)
        self.dtype = dtype
        self.max_active = max_active
        self.max_context = max_context
        s = self.shape
        inner = hf_model.model
        with torch.no_grad():
            self.embed = inner.embed_tokens.weight.detach().to(dtype).contiguous()
            head = hf_model.lm_head.weight
            tied = head.data_ptr() == inner.embed_tokens.weight.data_ptr()
            self.lm_head = self.embed if tied else head.detach().to(dtype).contiguous()
            self.final_norm = inner.norm.weight.detach().to(dtype).contiguous()
            self.layers = [
                _Layer(
                    norm1=layer.input_layernorm.weight.detach().to(dtype).contiguous(),
                    qkv=torch.cat(
                        [
                            layer.self_attn.q_proj.weight,
                            layer.self_attn.k_proj.weight,
                            layer.self_attn.v_proj.weight,
                        ]
                    )
                    .to(dtype)
                    .contiguous(),
                    out=layer.self_attn.o_proj.weight.detach().to(dtype).contiguous(),
                    norm2=layer.post_attention_layernorm.weight.detach().to(dtype).contiguous(),
                    gate_up=torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])
                    .detach()
                    .to(dtype)
                    .contiguous(),
                    down=layer.mlp.down_proj.weight.detach().to(dtype).contiguous(),
                )
                for layer in inner.layers
            ]
        self._q = s.heads * s.head_dim
        self._kv = s.kv_heads * s.head_dim
        inv_freq = 1.0 / (
            s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.float32) / s.head_dim)
        )
        freqs = torch.outer(torch.arange(max_context, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self._cos, self._sin = emb.cos().to(dtype), emb.sin().to(dtype)
        # Uninitialised, so memory is committed only as sequences grow, and cleaned lazily:
        # a decode step attends over every slot up to the longest one and masks the
        # rest, but a masked NaN in never-written memory still poisons the weighted sum
        # (0 * NaN). ``_clean[b]`` is how far slot b holds finite values; decode zeroes
        # ahead of it in chunks. Stale values from earlier sequences are finite and safe.
        cache_shape = (max_active, s.kv_heads, max_context, s.head_dim)
        self.k_cache = [torch.empty(cache_shape, dtype=dtype) for _ in range(s.layers)]
        self.v_cache = [torch.empty(cache_shape, dtype=dtype) for _ in range(s.layers)]
        self._clean = [0] * max_active
        self._positions = torch.arange(max_context)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.shape.rms_eps)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _mlp(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        gate, up = F.linear(self._norm(x, layer.norm2), layer.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer.down)

    def _split_qkv(self, x: torch.Tensor, layer: _Layer) -> tuple[torch.Tensor, ...]:
        qkv = F.linear(self._norm(x, layer.norm1), layer.qkv)
        return qkv.split([self._q, self._kv, self._kv], dim=-1)

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int]) -> torch.Tensor:
        """Run a whole prompt into ``slot``'s cache; return the last position's logits [vocab]."""
        s = self.shape
        length = len(token_ids)
        x = self.embed[torch.tensor(token_ids)]  # [L, hidden]
        cos, sin = self._cos[:length], self._sin[:length]
        for i, layer in enumerate(self.layers):
            q, k, v = self._split_qkv(x, layer)
            q = self._rope(q.view(length, s.heads, s.head_dim).transpose(0, 1), cos, sin)
            k = self._rope(k.view(length, s.kv_heads, s.head_dim).transpose(0, 1), cos, sin)
            v = v.view(length, s.kv_heads, s.head_dim).transpose(0, 1)
            self.k_cache[i][slot, :, :length] = k
            self.v_cache[i][slot, :, :length] = v
            attn = F.scaled_dot_product_attention(
                q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True, enable_gqa=True
            )
            x = x + F.linear(attn[0].transpose(0, 1).reshape(length, self._q), layer.out)
            x = self._mlp(x, layer)
        self._clean[slot] = max(self._clean[slot], length)
        return F.linear(self._norm(x[-1:], self.final_norm), self.lm_head)[0].float()

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One step for slots ``0..n-1``: token ``token_ids[b]`` sits at ``positions[b]``.

        Returns logits ``[n, vocab]``. Each slot attends only to its own first
        ``positions[b] + 1`` cache entries, so sequences of any length share the step.
        """
        s = self.shape
        n = len(token_ids)
        pos = torch.tensor(positions)
        span = max(positions) + 1
        self._clean_up_to(n, span)
        rows = torch.arange(n)
        mask = (self._positions[:span].unsqueeze(0) <= pos.unsqueeze(1)).view(n, 1, 1, span)
        cos, sin = self._cos[pos].unsqueeze(1), self._sin[pos].unsqueeze(1)  # [n, 1, d]
        x = self.embed[torch.tensor(token_ids)]  # [n, hidden]
        for i, layer in enumerate(self.layers):
            q, k, v = self._split_qkv(x, layer)
            q = self._rope(q.view(n, s.heads, s.head_dim), cos, sin)
            k = self._rope(k.view(n, s.kv_heads, s.head_dim), cos, sin)
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v.view(n, s.kv_heads, s.head_dim)
            attn = F.scaled_dot_product_attention(
                q.unsqueeze(2), kc[:n, :, :span], vc[:n, :, :span], attn_mask=mask, enable_gqa=True
            )
            x = x + F.linear(attn.reshape(n, self._q), layer.out)
            x = self._mlp(x, layer)
        return F.linear(self._norm(x, self.final_norm), self.lm_head).float()

    def _clean_up_to(self, n: int, span: int) -> None:
        """Make positions ``< span`` finite in slots ``0..n-1`` (zeroing 64 ahead at a time)."""
        for slot in range(n):
            start = self._clean[slot]
            if start < span:
                end = min(self.max_context, span + _CLEAN_AHEAD)
                for kc, vc in zip(self.k_cache, self.v_cache, strict=True):
                    kc[slot, :, start:end] = 0
                    vc[slot, :, start:end] = 0
                self._clean[slot] = end

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's cache from ``src`` to ``dst`` (keeps active slots contiguous)."""
        for kc, vc in zip(self.k_cache, self.v_cache, strict=True):
            kc[dst, :, :length] = kc[src, :, :length]
            vc[dst, :, :length] = vc[src, :, :length]
        self._clean[dst] = max(self._clean[dst], length)
