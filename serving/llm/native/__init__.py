"""The engine's native decode-attention kernel: C, compiled on first use, loaded by ctypes.

``decode_attention.c`` does one decode step's attention for every active sequence, with
its KV cache write, in one call per layer. The ATen path it replaces (``index_put`` of the
new keys and values, two batched products of 3x64 by 64xT matrices, a mask and a softmax)
took 22 of the 34 ms that a 16-sequence step spends outside its weight products (AVX2
EPYC, span 201). Each sequence attends to its own length only: no mask, no work on the
positions between its end and the longest sequence's.

Built with the machine's C compiler (``$CC``, else ``cc``) for x86-64 with AVX2 and FMA
(x86-64-v3, which every CPU the tiers target has), into the cache folder under a name that
hashes the source, the flags and the compiler's version, so a changed kernel or compiler
builds anew. It links OpenMP against the ``libgomp.so.1`` torch already loaded, so its
threads are torch's (one pool, no second runtime spinning beside it).

Where it cannot be used (no compiler, another architecture, a CPU without AVX2, a failed
build, ``TRITON_LLM_NATIVE=0``) :func:`load` logs why once and returns ``None``, and the
runner keeps the ATen path, which stays the reference the kernel is tested against.
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
from pathlib import Path

import torch

from serving.assets import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.c")
FLAGS = ("-O3", "-std=gnu11", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared")
#: The kernel's limits (``MAX_GROUP``, ``MAX_HEAD_DIM`` and ``CHUNK`` in the source).
MAX_GROUP = 16
MAX_HEAD_DIM = 256
#: Set to ``0`` to keep the ATen path (an A/B, or a machine whose build misbehaves).
ENV_SWITCH = "TRITON_LLM_NATIVE"


class NativeAttention:
    """The loaded kernel; :meth:`__call__` runs one layer's decode attention."""

    def __init__(self, library: ctypes.CDLL) -> None:
        fn = library.decode_attention
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr]
        fn.argtypes += [i32, i32, i32, i32, i64, ctypes.c_float]
        fn.restype = i32
        self._fn = fn

    @staticmethod
    def supports(heads: int, kv_heads: int, head_dim: int) -> bool:
        group = heads // kv_heads
        return (
            heads % kv_heads == 0
            and group <= MAX_GROUP
            and head_dim % 64 == 0
            and head_dim <= MAX_HEAD_DIM
        )

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        positions: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Write ``k``/``v`` [n, kv_heads, d] at ``positions`` [n] (int64) of slots 0..n-1
        of the caches [slots, kv_heads, context, d], and attend ``q`` [n, heads, d] to
        each slot's positions up to its own; returns [n, heads * d] float32.

        Rows may be strided (views into the fused projection), heads and dimensions must
        be contiguous within a row; the caches must be contiguous.
        """
        n, heads, head_dim = q.shape
        kv_heads, context = k_cache.shape[1], k_cache.shape[2]
        for t in (q, k, v):
            if t.dtype != torch.float32 or t.stride(2) != 1 or t.stride(1) != head_dim:
                raise ValueError("decode_attention: q, k, v need float32 rows of whole heads")
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("decode_attention: the caches must be contiguous")
        if positions.dtype != torch.int64 or positions.shape != (n,) or n > k_cache.shape[0]:
            raise ValueError("decode_attention: one int64 position per active slot")
        positions = positions.contiguous()
        out = torch.empty(n, heads * head_dim)
        status = self._fn(
            q.data_ptr(),
            q.stride(0),
            k.data_ptr(),
            k.stride(0),
            v.data_ptr(),
            v.stride(0),
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
        )
        if status == -2:
            raise ValueError(f"decode_attention: unsupported shape {tuple(q.shape)}")
        if status != 0:
            raise MemoryError("decode_attention: could not allocate its score buffer")
        return out


def _unavailable(reason: str) -> None:
    log.warning("native decode attention unavailable (%s); using the ATen path", reason)


def _compiler_id(compiler: str) -> str:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    return done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout else compiler


def build(target_dir: Path | None = None) -> Path:
    """Compile the kernel (once per source, flags and compiler) and return the library.

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
    target = folder / f"decode_attention-{key}.so"
    if target.is_file():
        return target
    # Build beside the target, then rename: concurrent model instances never load a
    # half-written library, and the last rename wins with identical bytes.
    fd, tmp = tempfile.mkstemp(prefix="decode_attention-", suffix=".so", dir=folder)
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
def load() -> NativeAttention | None:
    """The kernel, built if needed; ``None`` (logged once) where it cannot be used."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("native decode attention off (%s=0); using the ATen path", ENV_SWITCH)
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _unavailable(f"built for x86-64 only, this is {platform.machine()}")
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        _unavailable(f"the CPU has no AVX2 (torch reports {capability})")
        return None
    try:
        return NativeAttention(ctypes.CDLL(str(build())))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _unavailable(str(exc))
        return None
