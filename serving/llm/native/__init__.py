"""The engine's native kernels: C, compiled on first use, loaded by ctypes.

``kernels.c`` does a decode step's work outside the weight products in four calls per
layer: RoPE, the KV cache write and attention for every active sequence in one; the
residual add with the next RMSNorm (twice); SiLU-and-multiply. ATen's attention alone
(``index_put`` of the new keys and values, two batched products of 3x64 by 64xT matrices,
a mask and a softmax) took 22 of the 34 ms that a 16-sequence step spent outside its weight
products (AVX2 EPYC, span 201). Each sequence attends to its own length only: no mask, no
work on the positions between its end and the longest sequence's.

It also does the weight products themselves, for weights packed into panels of 16 output
columns (:class:`PackedWeight`: float32, bfloat16, or int8 with a scale per column;
float32 accumulation). Each output is one FMA chain in a fixed order, so a row's result
depends neither on how many rows share the product (greedy decoding is bitwise
batch-invariant) nor on which CPU runs it. Where the CPU has AVX-512 the products run on
16-float registers (:data:`ISAS`): the same chains in the same order, so the same bits.

Built with the machine's C compiler (``$CC``, else ``cc``) for x86-64 with AVX2 and FMA
(x86-64-v3, which every CPU the tiers target has), into the cache folder under a name that
hashes the source, the flags and the compiler's version, so a changed kernel or compiler
builds anew. It links OpenMP against the ``libgomp.so.1`` torch already loaded, so its
threads are torch's (one pool, no second runtime spinning beside it).

Where it cannot be used (no compiler, another architecture, a CPU without AVX2, a failed
build, ``TRITON_LLM_NATIVE=0``) :func:`load` logs why once and returns ``None``, and the
runner keeps the ATen path, which stays the reference the kernels are tested against.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.assets import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-std=gnu11", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared")
#: The kernel's limits (``MAX_GROUP``, ``MAX_HEAD_DIM`` and ``CHUNK`` in the source).
MAX_GROUP = 16
MAX_HEAD_DIM = 256
#: Output columns per panel of a packed weight (``PANEL`` in the source).
PANEL = 16
#: The float weight dtypes the packed product takes (int8 comes with scales, see
#: :meth:`NativeKernels.pack`); accumulation is float32 for all.
PACKED_DTYPES = (torch.float32, torch.bfloat16)
#: Set to ``0`` to keep the ATen path (an A/B, or a machine whose build misbehaves).
ENV_SWITCH = "TRITON_LLM_NATIVE"
#: The instruction sets the weight products are built for, each a suffix of the C names;
#: the other kernels are AVX2 on every CPU.
ISAS = {"avx2": "", "avx512": "_avx512"}
#: ``avx2`` or ``avx512`` picks the products' instruction set (default: the widest the CPU
#: has), for an A/B on one machine.
ISA_SWITCH = "TRITON_LLM_NATIVE_ISA"


class NativeKernels:
    """The loaded library: one method per kernel, each checking what it is given.

    ``isa`` picks the weight products' instruction set: ``"avx2"``, ``"avx512"``, or
    ``None`` for :data:`ISA_SWITCH`, else the widest this CPU has. ``ValueError`` for one
    it does not know or this CPU lacks.
    """

    def __init__(self, library: ctypes.CDLL, isa: str | None = None) -> None:
        ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        self._library = library
        library.has_avx512.restype = i32
        self.available = ("avx2", "avx512") if library.has_avx512() else ("avx2",)
        isa = isa or os.environ.get(ISA_SWITCH) or self.available[-1]
        if isa not in ISAS:
            raise ValueError(f"unknown instruction set {isa!r}: one of {', '.join(ISAS)}")
        if isa not in self.available:
            raise ValueError(f"this CPU has no {isa} for the native products")
        self.isa = isa
        self._attention = library.decode_attention
        self._attention.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr]
        self._attention.argtypes += [i32, i32, i32, i32, i64, f32, i32]
        self._attention.restype = i32
        self._add_rms_norm = library.add_rms_norm
        self._add_rms_norm.argtypes = [ptr, ptr, ptr, ptr, i32, i32, f32]
        self._add_rms_norm.restype = None
        self._silu_mul = library.silu_mul
        self._silu_mul.argtypes = [ptr, ptr, i32, i32]
        self._silu_mul.restype = None
        self._matmul = {}
        names = {
            torch.float32: "matmul_f32",
            torch.bfloat16: "matmul_bf16",
            torch.int8: "matmul_i8",
        }
        for dtype, name in names.items():
            function = getattr(library, name + ISAS[isa])
            function.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i32, i32, i32, i32]
            function.restype = i32
            self._matmul[dtype] = function

    def with_isa(self, isa: str) -> NativeKernels:
        """The same library with its products on ``isa`` (an A/B on one machine)."""
        return NativeKernels(self._library, isa)

    @staticmethod
    def supports(heads: int, kv_heads: int, head_dim: int, hidden: int, intermediate: int) -> bool:
        """Whether a model of these dimensions fits the kernels' limits."""
        return (
            heads % kv_heads == 0
            and heads // kv_heads <= MAX_GROUP
            and head_dim % 64 == 0
            and head_dim <= MAX_HEAD_DIM
            and hidden % 8 == 0
            and intermediate % 8 == 0
        )

    def attention(
        self,
        qkv: torch.Tensor,
        heads: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """One layer's decode attention from its fused projection ``qkv`` [n, (heads +
        2 kv_heads) * d] (queries, keys, values, not rotated): rotates the queries and
        keys by RoPE at ``positions`` [n] (int64, rows of the ``cos``/``sin`` tables
        [context, d]), writes each key and value to its position in slots 0..n-1 of the
        caches [slots, kv_heads, context, d], and attends each slot's queries to its
        positions up to its own. Returns [n, heads * d] float32.
        """
        tables = (k_cache, v_cache, cos, sin)
        if not all(t.is_contiguous() and t.dtype == torch.float32 for t in tables):
            raise ValueError("decode_attention: caches and tables must be contiguous float32")
        if k_cache.shape != v_cache.shape:
            raise ValueError("decode_attention: the K and V caches differ in shape")
        _, kv_heads, context, head_dim = k_cache.shape
        n = qkv.shape[0]
        if qkv.dtype != torch.float32 or qkv.stride(1) != 1:
            raise ValueError("decode_attention: qkv must be float32 rows")
        if qkv.shape[1] != (heads + 2 * kv_heads) * head_dim:
            raise ValueError(f"decode_attention: qkv rows of {qkv.shape[1]} do not fit")
        if cos.shape != (context, head_dim) or sin.shape != cos.shape:
            raise ValueError("decode_attention: cos/sin must be [context, head_dim]")
        if positions.dtype != torch.int64 or positions.shape != (n,) or n > k_cache.shape[0]:
            raise ValueError("decode_attention: one int64 position per active slot")
        positions = positions.contiguous()
        out = torch.empty(n, heads * head_dim)
        status = self._attention(
            qkv.data_ptr(),
            qkv.stride(0),
            cos.data_ptr(),
            sin.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            positions.data_ptr(),
            out.data_ptr(),
            n,
            kv_heads,
            heads // kv_heads,
            head_dim,
            context,
            scale,
            torch.get_num_threads(),
        )
        if status == -3:
            raise ValueError(f"decode_attention: positions must lie in [0, {context})")
        if status == -2:
            raise ValueError(
                f"decode_attention: unsupported shape {heads=} {kv_heads=} {head_dim=}"
            )
        if status != 0:
            raise MemoryError("decode_attention: could not allocate its score buffer")
        return out

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """``x += delta`` in place (none when ``delta`` is None), then RMSNorm of ``x``
        [n, width] with ``weight`` [width]: the residual add and the next norm."""
        n, width = x.shape
        parts = (x, weight) if delta is None else (x, delta, weight)
        if not all(t.is_contiguous() and t.dtype == torch.float32 for t in parts):
            raise ValueError("add_rms_norm: contiguous float32 tensors only")
        if weight.shape != (width,) or (delta is not None and delta.shape != x.shape):
            raise ValueError("add_rms_norm: shapes do not match")
        if width % 8:
            raise ValueError("add_rms_norm: width must be a multiple of 8")
        out = torch.empty_like(x)
        delta_ptr = None if delta is None else delta.data_ptr()
        self._add_rms_norm(
            x.data_ptr(), delta_ptr, weight.data_ptr(), out.data_ptr(), n, width, eps
        )
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for ``gate_up`` [n, 2 * width] (gate first): [n, width]."""
        n, double = gate_up.shape
        if not gate_up.is_contiguous() or gate_up.dtype != torch.float32 or double % 16:
            raise ValueError("silu_mul: contiguous float32 rows of a multiple of 16")
        out = torch.empty(n, double // 2)
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), n, double // 2)
        return out

    def pack(
        self,
        weight: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        scales: torch.Tensor | None = None,
    ) -> PackedWeight:
        """A ``[in, out]`` weight (the runner's ``x @ w`` layout) as panels of
        :data:`PANEL` output columns in ``dtype``: float32 or bfloat16 from a float
        weight, or ``torch.int8`` from an int8 weight with ``scales`` [out] (the product
        is ``(x @ weight) * scales``). Columns past ``out`` up to the next multiple of the
        panel are zero."""
        if weight.dim() != 2 or 0 in weight.shape:
            raise ValueError("pack: a non-empty [in, out] weight")
        rows_in, cols = weight.shape
        padded = -(-cols // PANEL) * PANEL
        if dtype == torch.int8:
            if weight.dtype != torch.int8 or scales is None or scales.shape != (cols,):
                raise ValueError("pack: int8 takes an int8 weight and one scale per column")
            scales = torch.cat([scales.detach().float(), scales.new_zeros(padded - cols).float()])
        elif dtype not in PACKED_DTYPES or not weight.is_floating_point() or scales is not None:
            raise ValueError(f"pack: a float weight as float32 or bfloat16, not {dtype}")
        w = weight.detach().to(dtype)
        if padded != cols:
            w = torch.cat([w, w.new_zeros(rows_in, padded - cols)], dim=1)
        panels = w.view(rows_in, padded // PANEL, PANEL).transpose(0, 1).contiguous()
        return PackedWeight(panels, scales, rows_in, cols, self)

    def matmul(self, x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
        """``x @ w`` as float32 [rows, out] for ``x`` float32 [rows, in] (rows may be
        strided; a row that is not contiguous is copied first)."""
        if x.dtype != torch.float32 or x.dim() != 2:
            raise ValueError("matmul: x must be float32 [rows, in]")
        if x.shape[1] != weight.in_features:
            raise ValueError(
                f"matmul: x has {x.shape[1]} columns, the weight {weight.in_features} rows"
            )
        x = x if x.stride(1) == 1 else x.contiguous()
        rows, padded = x.shape[0], weight.panels.shape[0] * PANEL
        out = torch.empty(rows, padded)
        if rows:
            status = self._matmul[weight.panels.dtype](
                x.data_ptr(),
                x.stride(0),
                weight.panels.data_ptr(),
                None if weight.scales is None else weight.scales.data_ptr(),
                out.data_ptr(),
                padded,
                rows,
                weight.in_features,
                padded,
                torch.get_num_threads(),
            )
            if status != 0:
                raise ValueError(f"matmul: the kernel refused the shapes ({status})")
        return out if padded == weight.out_features else out[:, : weight.out_features]


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A matmul weight ``[in, out]`` packed for the native product: ``panels`` is
    ``[ceil(out / 16), in, 16]`` float32, bfloat16 or int8, one panel per 16 output
    columns, so a product reads each panel once, front to back; int8 ones have ``scales``
    (float32, one per column, padded like the panels). Float32 accumulation in every dtype."""

    panels: torch.Tensor
    scales: torch.Tensor | None
    in_features: int
    out_features: int
    kernels: NativeKernels

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.matmul(x, self)

    def unpack(self) -> torch.Tensor:
        """The ``[in, out]`` weight as float32 (what the product multiplies by)."""
        w = self.panels.float().transpose(0, 1).reshape(self.in_features, -1)
        if self.scales is not None:
            w = w * self.scales
        return w[:, : self.out_features]

    @property
    def dtype(self) -> torch.dtype:
        return self.panels.dtype

    def numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def nbytes(self) -> int:
        """Bytes a product reads (the panels and scales, padding included)."""
        return self.panels.nbytes + (0 if self.scales is None else self.scales.nbytes)


def _unavailable(reason: str) -> None:
    log.warning("native kernels unavailable (%s); using the ATen path", reason)


def _compiler_id(compiler: str) -> str:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    return done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout else compiler


def build(target_dir: Path | None = None) -> Path:
    """Compile the kernels (once per source, flags and compiler) and return the library.

    Raises ``RuntimeError`` naming what is missing or what the compiler said.
    """
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        raise RuntimeError("no C compiler: install gcc, or set CC")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        source + " ".join(FLAGS).encode() + _compiler_id(compiler).encode()
    ).hexdigest()[:12]
    folder = target_dir or cache_dir() / "native"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"kernels-{key}.so"
    if target.is_file():
        return target
    # Build beside the target, then rename: concurrent model instances never load a
    # half-written library, and the last rename wins with identical bytes.
    fd, tmp = tempfile.mkstemp(prefix="kernels-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def load() -> NativeKernels | None:
    """The kernels, built if needed; ``None`` (logged once) where they cannot be used."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("native decode kernels off (%s=0); using the ATen path", ENV_SWITCH)
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _unavailable(f"built for x86-64 only, this is {platform.machine()}")
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        _unavailable(f"the CPU has no AVX2 (torch reports {capability})")
        return None
    try:
        path = build()
        kernels = NativeKernels(ctypes.CDLL(str(path)))
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
        _unavailable(str(exc))
        return None
    log.info("native kernels (products on %s): %s", kernels.isa, path)
    return kernels
