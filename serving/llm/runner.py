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

from serving.llm import native

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


#: Up to this many rows (a decode step of up to 4 sequences) an int8 weight is read as
#: int8; a longer product (a bigger decode step, a prompt's prefill) uses the float32
#: weight. The int8 kernel stops being memory-bound beyond a few rows. Measured over the
#: 30 layers' weights, 2 threads (AVX-512 Xeon): 1 row 16 ms int8 vs 25-38 float32,
#: 4 rows 26-29 vs 48, 8 rows 50 vs 53, 16 rows 99 vs 63; a 150-token prefill 889 ms vs 413.
INT8_MAX_ROWS = 4


#: The row count oneDNN's blocked layout is chosen for: prefill and 5-16-row decode steps.
_ONEDNN_ROWS_HINT = 64


def prepack_float32(weight: torch.Tensor) -> torch.Tensor:
    """A float32 ``[in, out]`` weight for many-row products on the ATen path: oneDNN's
    blocked layout (where the native kernels load, their panels are used instead).

    Over the 30 layers' weights (2 threads, AVX-512 Xeon) oneDNN's prepacked linear took
    47 ms at 16 rows against 60 for MKL on the plain ``[in, out]`` weight (which repacks
    the weight on every call), and 109 ms against 161 at 64 rows; at one row it was no
    faster, which is why :class:`Float32Weight` keeps a plain copy for one-row products.
    It is used for the ``lm_head`` (one big product, faster at every row count), for the
    float32 tier's products of more than :data:`FLOAT32_PLAIN_MAX_ROWS` rows and for the
    int8 tier's products of more than :data:`INT8_MAX_ROWS` rows. The plain weight is
    returned where PyTorch was built without oneDNN; :func:`float32_matmul` takes either,
    and the native kernels' :class:`~serving.llm.native.PackedWeight` as well.
    """
    if torch.backends.mkldnn.is_available():
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(
                weight.t().contiguous(), _ONEDNN_ROWS_HINT
            )
        except (AttributeError, RuntimeError) as exc:  # a build without the prepack op
            log.warning("oneDNN weight prepacking unavailable (%s); using MKL", exc)
        else:
            return packed
    return weight.contiguous()


def float32_matmul(x: torch.Tensor, weight: torch.Tensor | native.PackedWeight) -> torch.Tensor:
    """``x @ w`` in float32 for a weight from :func:`prepack_float32` or a float32
    :class:`~serving.llm.native.PackedWeight`."""
    if isinstance(weight, native.PackedWeight):
        return weight.matmul(x.float())
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(
            x.float().contiguous(), weight, None, "none", [], ""
        )
    return x.float() @ weight


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float ``[in, out]`` weight as int8 ``q`` [out, in] and bfloat16 ``scales`` [out],
    one per output channel: ``scale = max|w| / 127``, rounded to bfloat16 *before* the
    weights are divided by it, so ``q * scale`` is exactly the weight a product uses."""
    w = weight.detach().float().t()  # [out, in]
    scales = (w.abs().amax(dim=1).clamp(min=1e-8) / 127).to(torch.bfloat16)
    q = torch.round(w / scales.float().unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


@dataclass(frozen=True)
class Int8Weight:
    """A matmul weight as int8 with one scale per output channel, for decode steps.

    ``q`` is ``[out, in]`` int8 and ``scales`` ``[out]`` bfloat16, the layout of ATen's
    ``_weight_int8pack_mm`` (the CPU kernel torchao and gpt-fast use). The scale is
    rounded to bfloat16 *before* the weights are divided by it, so ``q * scale`` is the
    weight the product really uses and the only error is the int8 rounding of each weight
    (at most half a step, ``max|w| / 254`` of its output channel). A decode step of up
    to :data:`INT8_MAX_ROWS` sequences reads a quarter of float32's bytes, which is what
    one memory-bound stream is paid for.

    ``full`` keeps the float32 weight for products of more than :data:`INT8_MAX_ROWS`
    rows (a prefill, a decode step of more sequences), so a prompt's cache and first token
    are float32 products (within 1e-4 of the float32 tier's logits); it costs the float32
    weight's memory, and its reads only where the int8 kernel would be slower. It is held
    in oneDNN's blocked layout for its linear kernel (:func:`prepack_float32`) where
    PyTorch has oneDNN: a 16-sequence step of the int8 tier took 87-88 ms against 100-105
    with MKL's product on the plain weight, and a 695-token packed prefill the same 1.0 s.
    """

    q: torch.Tensor
    scales: torch.Tensor
    full: torch.Tensor  # float32: oneDNN-blocked, or plain [in, out] (see prepack_float32)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Weight:
        """From a float ``[in, out]`` weight (the runner's ``x @ w`` layout)."""
        q, scales = quantize_int8(weight)
        return cls(q=q, scales=scales, full=prepack_float32(weight.detach().float()))

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[in, out]`` weight this stands for."""
        return (self.q.float() * self.scales.float().unsqueeze(1)).t()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ w`` as float32. Decode rows: bfloat16 activations into the int8 kernel
        (float32 accumulation; its fast path takes bfloat16 activations only: float32 ones
        were 15x slower, float16 ones 12x, on an AVX-512 Xeon). Prefill rows: float32."""
        if x.shape[0] > INT8_MAX_ROWS:
            return float32_matmul(x, self.full)
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scales).float()

    def numel(self) -> int:
        return self.q.numel()

    @property
    def nbytes(self) -> int:
        """Bytes a decode step of up to :data:`INT8_MAX_ROWS` sequences reads."""
        return self.q.nbytes + self.scales.nbytes


#: Products of at most this many rows (a one-sequence decode step) read the float32 tier's
#: plain ``[in, out]`` weights; more rows use its oneDNN-blocked copy. Over the 30 layers'
#: weights, 2 threads (``benchmarks/llm_matmul.py``, results in
#: ``benchmarks/results/llm_matmul.md``), plain vs blocked: on an AVX2 AMD EPYC 1 row
#: 36.0 vs 36.9 ms, 2 rows 49.9 vs 35.0, 4 rows 100 vs 38, 16 rows 101 vs 63; on an
#: AVX-512 Xeon (an earlier session) 1 row 24 vs 39 ms, 16 rows 60 vs 47.
FLOAT32_PLAIN_MAX_ROWS = 1


@dataclass(frozen=True)
class Float32Weight:
    """A float32 matmul weight held in two layouts, one for each kind of product.

    ``plain`` is ``[in, out]`` for one-row products: a decode step of one sequence is a
    memory-bound read of every weight, and MKL's product streams the plain layout at least
    as fast as oneDNN's. ``blocked`` is oneDNN's layout (:func:`prepack_float32`) for
    products of more rows (decode steps of several sequences, prefills), where MKL repacks
    the plain weight on every call and was 1.5-2.5x slower. Both are exact float32 products
    with float32 accumulation; they differ only in summation order (within 1e-4 on the
    logits). The price is memory: the tier holds its layer weights twice (425 MB more for
    SmolLM2-135M), as the int8 tier holds a float32 copy beside its int8 weights.
    """

    plain: torch.Tensor
    blocked: torch.Tensor  # oneDNN-blocked, or the plain tensor where PyTorch lacks oneDNN

    @classmethod
    def of(cls, weight: torch.Tensor) -> Float32Weight:
        """From a float ``[in, out]`` weight (the runner's ``x @ w`` layout)."""
        plain = weight.detach().float().contiguous()
        return cls(plain=plain, blocked=prepack_float32(plain))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ w`` as float32 (``x`` float32 ``[rows, in]``)."""
        if x.shape[0] <= FLOAT32_PLAIN_MAX_ROWS:
            return torch.mm(x, self.plain)
        return float32_matmul(x, self.blocked)

    def numel(self) -> int:
        return self.plain.numel()

    @property
    def nbytes(self) -> int:
        """Bytes a one-sequence decode step reads (the plain weight)."""
        return self.plain.nbytes


#: A matmul weight: the native kernels' panels, or (ATen path) a float tensor
#: ``[in, out]``, int8 with per-channel scales, or float32 in two layouts.
Weight = torch.Tensor | Int8Weight | Float32Weight | native.PackedWeight


@dataclass
class _Layer:
    """One decoder layer's weights, matmul weights stored ``[in, out]`` (``x @ w``)."""

    norm1: torch.Tensor  # float32
    qkv: Weight  # [hidden, q + k + v]
    out: Weight
    norm2: torch.Tensor  # float32
    gate_up: Weight  # [hidden, 2 * intermediate]
    down: Weight

    def matmul_weights(self) -> tuple[Weight, ...]:
        return (self.qkv, self.out, self.gate_up, self.down)


def load_hf_model(gguf_path: Path) -> Any:
    """Load the transformers model from a GGUF file beside its package (never a hub)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


class LlamaRunner:
    """Prefill one prompt into a slot, decode one token for every active slot at once.

    Numerics (why the same code gives the same tokens on every x86-64 CPU): only the
    matmul weights take ``dtype``. The residual stream, RMSNorm, RoPE, the KV cache,
    attention and the logits are float32, as transformers keeps them; the logits come from
    a float32 ``lm_head`` (float32 accumulation, no bfloat16 rounding of the result). A
    bfloat16 product therefore only perturbs the logits by the weights' own rounding, and
    no longer turns a 0.09 margin into a tie that each CPU's kernels break their own way.

    Weight layouts: where the native kernels loaded, the layer weights (float32, bfloat16,
    or int8 with per-channel scales) and the float32 ``lm_head`` are
    :class:`~serving.llm.native.PackedWeight`: one copy, every row count, each output
    summed in one fixed order (bitwise batch-invariant).
    Without them: the float32 tier's layer weights are :class:`Float32Weight` (plain
    ``[in, out]`` for one-sequence steps, oneDNN-blocked for more rows), bfloat16 ones
    plain ``[in, out]``, and the ``lm_head`` is float32 in oneDNN's blocked layout in every
    dtype (:func:`prepack_float32`).
    """

    def __init__(
        self,
        hf_model: Any,
        max_active: int,
        max_context: int,
        dtype: torch.dtype = torch.float32,
        float32_blocked_copy: bool = True,
        native_kernels: bool | None = None,
    ) -> None:
        """``float32_blocked_copy=False`` keeps float32 layer weights plain only: half
        their memory, slower products of more than one row (see :class:`Float32Weight`).

        ``native_kernels``: the C kernels of :mod:`serving.llm.native` run a decode step's
        work outside the weight products (RoPE, the cache write, attention, residual adds,
        norms, SiLU) and every weight product (packed weights, one copy) when ``True``;
        ATen and oneDNN do when ``False``; ``None`` uses the kernels wherever they build
        and load, the ATen path elsewhere."""
        self.shape = LlamaShape.from_config(hf_model.config)
        self.dtype = dtype
        self.max_active = max_active
        self.max_context = max_context
        s = self.shape
        inner = hf_model.model
        f32 = torch.float32
        self.native: native.NativeKernels | None = None
        if native_kernels is not False:
            fits = native.NativeKernels.supports(
                s.heads, s.kv_heads, s.head_dim, s.hidden, hf_model.config.intermediate_size
            )
            self.native = native.load() if fits else None
            if self.native is None and native_kernels:
                raise RuntimeError("native kernels were asked for but are unavailable")
        kernels = self.native

        def matmul_weight(*parts: torch.Tensor) -> Weight:
            weight = torch.cat([p.detach() for p in parts]).t()
            if kernels is not None and dtype == torch.int8:
                q, scales = quantize_int8(weight)
                return kernels.pack(q.t(), torch.int8, scales)
            if kernels is not None:
                return kernels.pack(weight, dtype)
            if dtype == torch.int8:
                return Int8Weight.quantize(weight)
            if dtype == torch.float32 and float32_blocked_copy:
                return Float32Weight.of(weight)
            return weight.to(dtype).contiguous()

        def vector(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(f32).contiguous()

        with torch.no_grad():
            self.embed = inner.embed_tokens.weight.detach().to(f32).contiguous()
            # float32 on purpose, whatever ``dtype`` is: these are the logits' weights. One
            # big product: the kernels' panels where they loaded (5.2 ms against oneDNN's
            # 8.4 at one row, 12.4 against 16 at 16, AVX2 EPYC), else oneDNN's blocked
            # layout, which pays at every row count: 6.5-6.7 ms against MKL's 5.5-9.7 at
            # one row, 6.6 against 11.6-12.4 at 4, 10 against 16 at 16 (AVX-512 Xeon).
            lm_head = hf_model.lm_head.weight.detach().t().to(f32)
            self.lm_head = prepack_float32(lm_head) if kernels is None else kernels.pack(lm_head)
            self.final_norm = vector(inner.norm.weight)
            self.layers = [
                _Layer(
                    norm1=vector(layer.input_layernorm.weight),
                    qkv=matmul_weight(
                        layer.self_attn.q_proj.weight,
                        layer.self_attn.k_proj.weight,
                        layer.self_attn.v_proj.weight,
                    ),
                    out=matmul_weight(layer.self_attn.o_proj.weight),
                    norm2=vector(layer.post_attention_layernorm.weight),
                    gate_up=matmul_weight(layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight),
                    down=matmul_weight(layer.mlp.down_proj.weight),
                )
                for layer in inner.layers
            ]
        self._q = s.heads * s.head_dim
        self._kv = s.kv_heads * s.head_dim
        self._group = s.heads // s.kv_heads
        self._scale = s.head_dim**-0.5
        inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=f32) / s.head_dim))
        freqs = torch.outer(torch.arange(max_context, dtype=f32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self._cos, self._sin = emb.cos(), emb.sin()
        # Uninitialised, so memory is committed only as sequences grow. The native kernels
        # read a slot only up to its own position. The ATen decode path attends over every
        # slot up to the longest one and masks the rest, but a masked NaN in never-written
        # memory still poisons the weighted sum (0 * NaN), so it cleans lazily: ``_clean[b]``
        # is how far slot b holds finite values, and that path zeroes ahead of it in chunks.
        # Stale values from earlier sequences are finite and safe.
        cache_shape = (max_active, s.kv_heads, max_context, s.head_dim)
        self.k_cache = [torch.empty(cache_shape, dtype=f32) for _ in range(s.layers)]
        self.v_cache = [torch.empty(cache_shape, dtype=f32) for _ in range(s.layers)]
        self._clean = [0] * max_active
        self._positions = torch.arange(max_context)

    def _matmul(self, x: torch.Tensor, weight: Weight) -> torch.Tensor:
        """``x @ weight`` in the weights' dtype, returned as float32."""
        if isinstance(weight, (Int8Weight, Float32Weight, native.PackedWeight)):
            return weight.matmul(x)
        return (x.to(weight.dtype) @ weight).float()

    def weight_footprint(self) -> tuple[int, int]:
        """(bytes, parameters) of the weights one decode step reads: every matmul + lm_head."""
        weights = [self.lm_head, *(w for layer in self.layers for w in layer.matmul_weights())]
        return sum(w.nbytes for w in weights), sum(w.numel() for w in weights)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.shape.rms_eps)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _mlp(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        gate, up = self._matmul(self._norm(x, layer.norm2), layer.gate_up).chunk(2, dim=-1)
        return x + self._matmul(F.silu(gate) * up, layer.down)

    def _qkv(self, x: torch.Tensor, layer: _Layer, cos: torch.Tensor, sin: torch.Tensor):
        """Project ``x`` [L, hidden]; q and k rotated together: [L, heads(+kv), d] each."""
        return self._split_rotate(self._matmul(self._norm(x, layer.norm1), layer.qkv), cos, sin)

    def _split_rotate(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The fused projection [L, q + k + v] as q, k (rotated) and v [L, heads, d]."""
        s = self.shape
        length = qkv.shape[0]
        qk = self._rope(qkv[:, : self._q + self._kv].view(length, -1, s.head_dim), cos, sin)
        v = qkv[:, self._q + self._kv :].view(length, s.kv_heads, s.head_dim)
        return qk[:, : s.heads], qk[:, s.heads :], v

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return float32_matmul(self._norm(x, self.final_norm), self.lm_head)

    def prefill(self, slot: int, token_ids: list[int]) -> torch.Tensor:
        """Run one prompt into ``slot``'s cache; return the last position's logits [vocab]."""
        return self.prefill_batch([slot], [token_ids])[0]

    @torch.inference_mode()
    def prefill_batch(
        self, slots: list[int], prompts: list[list[int]], cached: list[int] | None = None
    ) -> torch.Tensor:
        """Run several prompts, packed, into their slots' caches; logits ``[n, vocab]``.

        The prompts are concatenated into one ``[sum of lengths, hidden]`` activation, so
        every weight is read once for all of them and each product has many rows (where
        MKL's float32 GEMM is several times faster per row than at a single short prompt's
        few dozen). Only attention is per prompt: each prompt attends causally to itself.
        No padding: the tokens computed are exactly the prompts' tokens. Row ``b`` of the
        result is the last position of ``prompts[b]``.

        ``cached[b]`` (default 0) is how many leading tokens of ``prompts[b]`` already sit
        in its slot's cache (put there by :meth:`load_prefix`): only the tokens after them
        are computed, and they attend to the cached ones. At least one token must be left.
        """
        if len(slots) != len(prompts) or not prompts or not all(prompts):
            raise ValueError("prefill_batch needs one non-empty prompt per slot")
        cached = cached or [0] * len(prompts)
        if len(cached) != len(prompts) or not all(
            0 <= c < len(ids) for c, ids in zip(cached, prompts, strict=True)
        ):
            raise ValueError("prefill_batch: each cached prefix must leave a token to compute")
        new = [ids[c:] for ids, c in zip(prompts, cached, strict=True)]
        lengths = [len(ids) for ids in new]
        starts = [0]
        for length in lengths:
            starts.append(starts[-1] + length)
        x = self.embed[torch.tensor([t for ids in new for t in ids])]  # [T, hidden]
        positions = torch.cat(
            [self._positions[c : c + n] for c, n in zip(cached, lengths, strict=True)]
        )
        cos, sin = self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)
        # A prompt with a cached prefix attends to its whole cache span, causally from its
        # first new position: a boolean mask [new, cached + new] (True = may attend).
        masks = [
            None
            if c == 0
            else self._positions[: c + n].unsqueeze(0) <= self._positions[c : c + n].unsqueeze(1)
            for c, n in zip(cached, lengths, strict=True)
        ]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(x, layer, cos, sin)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [h, T, d]
            kc, vc = self.k_cache[i], self.v_cache[i]
            attn = torch.empty(x.shape[0], self._q)
            spans = zip(slots, cached, starts[:-1], starts[1:], masks, strict=True)
            for slot, c, start, end, mask in spans:
                length = end - start
                kc[slot, :, c : c + length] = k[:, start:end]
                vc[slot, :, c : c + length] = v[:, start:end]
                if mask is None:
                    keys, values = k[:, start:end], v[:, start:end]
                else:
                    keys, values = kc[slot, :, : c + length], vc[slot, :, : c + length]
                out = F.scaled_dot_product_attention(
                    q[:, start:end].unsqueeze(0),
                    keys.unsqueeze(0),
                    values.unsqueeze(0),
                    attn_mask=mask,
                    is_causal=mask is None,
                    enable_gqa=True,
                )
                attn[start:end] = out[0].transpose(0, 1).reshape(length, self._q)
            x = x + self._matmul(attn, layer.out)
            x = self._mlp(x, layer)
        for slot, total in zip(slots, (len(ids) for ids in prompts), strict=True):
            self._clean[slot] = max(self._clean[slot], total)
        return self._logits(x[torch.tensor(starts[1:]) - 1])

    def save_prefix(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of ``slot``'s first ``length`` cache positions: K and V, each
        ``[layers, kv_heads, length, head_dim]`` (for :meth:`load_prefix` into any slot)."""
        keys = torch.stack([kc[slot, :, :length] for kc in self.k_cache])
        values = torch.stack([vc[slot, :, :length] for vc in self.v_cache])
        return keys, values

    def load_prefix(self, slot: int, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Put the first ``length`` positions of a :meth:`save_prefix` copy into ``slot``."""
        for i, (kc, vc) in enumerate(zip(self.k_cache, self.v_cache, strict=True)):
            kc[slot, :, :length] = keys[i, :, :length]
            vc[slot, :, :length] = values[i, :, :length]
        self._clean[slot] = max(self._clean[slot], length)

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One step for slots ``0..n-1``: token ``token_ids[b]`` sits at ``positions[b]``.

        Returns float32 logits ``[n, vocab]``. Each slot attends only to its own first
        ``positions[b] + 1`` cache entries, so sequences of any length share the step.
        Everything but the weight products runs in the native kernels where they loaded
        (:attr:`native`: four calls a layer, besides the products), else in ATen
        (:class:`_AtenDecode`).
        """
        pos = torch.tensor(positions)
        ops = _NativeDecode(self, pos) if self.native else _AtenDecode(self, positions, pos)
        x, h = ops.add_rms_norm(self.embed[torch.tensor(token_ids)], None, self.layers[0].norm1)
        for i, layer in enumerate(self.layers):
            attn = ops.attention(i, self._matmul(h, layer.qkv))
            x, h = ops.add_rms_norm(x, self._matmul(attn, layer.out), layer.norm2)
            act = ops.silu_mul(self._matmul(h, layer.gate_up))
            following = self.layers[i + 1].norm1 if i + 1 < len(self.layers) else self.final_norm
            x, h = ops.add_rms_norm(x, self._matmul(act, layer.down), following)
        return float32_matmul(h, self.lm_head)

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


class _NativeDecode:
    """A decode step's non-matmul work in the native kernels (:mod:`serving.llm.native`)."""

    def __init__(self, runner: LlamaRunner, pos: torch.Tensor) -> None:
        assert runner.native is not None
        self._kernels, self._runner, self._pos = runner.native, runner, pos

    def add_rms_norm(self, x, delta, weight):
        h = self._kernels.add_rms_norm(x, delta, weight, self._runner.shape.rms_eps)
        return x, h  # x was added to in place

    def silu_mul(self, gate_up):
        return self._kernels.silu_mul(gate_up)

    def attention(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        r = self._runner
        return self._kernels.attention(
            qkv,
            r.shape.heads,
            r.k_cache[layer],
            r.v_cache[layer],
            self._pos,
            r._cos,
            r._sin,
            r._scale,
        )


class _AtenDecode:
    """The same work in ATen operators: the reference the kernels are tested against, and
    the path where they do not load.

    Attention is two batched products with the query heads grouped under their KV head
    (no copy of the cache per query head); for one query position that is several times
    cheaper than ``scaled_dot_product_attention``'s CPU kernel. Every slot attends over
    the longest span, masked past its own position.
    """

    def __init__(self, runner: LlamaRunner, positions: list[int], pos: torch.Tensor) -> None:
        self._runner, self._pos = runner, pos
        n, span = len(positions), max(positions) + 1
        # Only this path reads past a slot's position (masked): that memory must be finite.
        runner._clean_up_to(n, span)
        self._n, self._span, self._rows = n, span, torch.arange(n)
        self._cos, self._sin = runner._cos[pos].unsqueeze(1), runner._sin[pos].unsqueeze(1)
        # Additive mask [n, 1, 1, span]: 0 where a slot may attend, -inf past its position;
        # none when every slot is at the last position (always so for one sequence).
        self._mask = None
        if min(positions) < span - 1:
            self._mask = torch.zeros(n, 1, 1, span).masked_fill_(
                (runner._positions[:span].unsqueeze(0) > pos.unsqueeze(1)).view(n, 1, 1, span),
                float("-inf"),
            )

    def add_rms_norm(self, x, delta, weight):
        x = x if delta is None else x + delta
        return x, self._runner._norm(x, weight)

    def silu_mul(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def attention(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        r, s, n, span = self._runner, self._runner.shape, self._n, self._span
        q, k, v = r._split_rotate(qkv, self._cos, self._sin)
        kc, vc = r.k_cache[layer], r.v_cache[layer]
        kc[self._rows, :, self._pos] = k
        vc[self._rows, :, self._pos] = v
        q = q.reshape(n, s.kv_heads, r._group, s.head_dim)
        scores = torch.matmul(q, kc[:n, :, :span].transpose(2, 3)) * r._scale
        if self._mask is not None:
            scores = scores + self._mask
        attn = torch.matmul(torch.softmax(scores, dim=-1), vc[:n, :, :span])
        return attn.reshape(n, r._q)
