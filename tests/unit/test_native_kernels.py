"""The native decode kernels against the ATen path they replace, and their fallbacks."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest
import torch

from serving.assets import smollm2_gguf
from serving.llm import native
from serving.llm.runner import LlamaRunner, load_hf_model, quantize_int8

#: Where the kernel must load: CI's and every target machine's kind. Elsewhere the tests
#: that need it fail rather than skip, unless the machine really cannot build it.
BUILDABLE = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    and shutil.which("cc") is not None
)


@pytest.fixture(autouse=True)
def _fresh_load(monkeypatch):
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    native.load.cache_clear()
    yield
    native.load.cache_clear()


def kernels() -> native.NativeKernels:
    loaded = native.load()
    assert loaded is not None, "the kernels should build on an x86-64 AVX2 machine with cc"
    return loaded


def rope_tables(context: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(context).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().contiguous(), emb.sin().contiguous()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotate-half RoPE, written out again: x [heads, d], cos/sin [d]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def reference(qkv, heads, k_cache, v_cache, positions, cos, sin, scale):
    """Per slot, the textbook computation on the slot's own span (no batching, no mask)."""
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    out = []
    for b, pos in enumerate(positions.tolist()):
        row = qkv[b].reshape(-1, head_dim)
        q = rotate(row[:heads], cos[pos], sin[pos])
        k_cache[b, :, pos] = rotate(row[heads : heads + kv_heads], cos[pos], sin[pos])
        v_cache[b, :, pos] = row[heads + kv_heads :]
        group = heads // kv_heads
        keys = k_cache[b, :, : pos + 1].repeat_interleave(group, dim=0)  # [heads, T, d]
        values = v_cache[b, :, : pos + 1].repeat_interleave(group, dim=0)
        weights = torch.softmax(q.unsqueeze(1) @ keys.transpose(1, 2) * scale, dim=-1)
        out.append((weights @ values).reshape(-1))
    return torch.stack(out)


pytestmark = pytest.mark.skipif(not BUILDABLE, reason="needs x86-64 with AVX2 and a C compiler")


@pytest.mark.parametrize(("kv_heads", "group", "head_dim"), [(3, 3, 64), (2, 4, 128), (1, 1, 64)])
def test_attention_matches_the_textbook_and_writes_the_rotated_cache(kv_heads, group, head_dim):
    torch.manual_seed(0)
    slots, context, heads = 6, 80, kv_heads * group
    # lengths 1, 8, 9 (block edges), 17, 64 and 80 (the whole context)
    positions = torch.tensor([0, 7, 8, 16, 63, 79])
    n = len(positions)
    k_cache = torch.randn(slots, kv_heads, context, head_dim)
    v_cache = torch.randn(slots, kv_heads, context, head_dim)
    # as the runner may pass it: a view of rows wider than the projection
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim + 8)[:, :-8]
    cos, sin = rope_tables(context, head_dim)
    scale = head_dim**-0.5

    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected = reference(qkv, heads, expected_k, expected_v, positions, cos, sin, scale)
    got = kernels().attention(qkv, heads, k_cache, v_cache, positions, cos, sin, scale)

    assert got.shape == (n, heads * head_dim)
    assert torch.allclose(got, expected, atol=2e-6, rtol=1e-5)
    assert torch.allclose(k_cache, expected_k, atol=1e-6, rtol=1e-6)
    assert torch.equal(v_cache, expected_v)


def test_attention_ignores_what_lies_past_each_slots_position():
    torch.manual_seed(1)
    k_cache, v_cache = torch.randn(2, 3, 32, 64), torch.randn(2, 3, 32, 64)
    qkv, (cos, sin) = torch.randn(2, 15 * 64), rope_tables(32, 64)
    positions = torch.tensor([4, 20])
    first = kernels().attention(qkv, 9, k_cache, v_cache, positions, cos, sin, 0.125)
    k_cache[0, :, 5:] = float("nan")  # never written memory may hold anything
    v_cache[0, :, 5:] = float("inf")
    second = kernels().attention(qkv, 9, k_cache, v_cache, positions, cos, sin, 0.125)
    assert torch.equal(first, second)


def test_attention_rejects_what_it_cannot_read():
    attend = kernels().attention
    caches = torch.zeros(2, 3, 16, 64), torch.zeros(2, 3, 16, 64)
    tables = rope_tables(16, 64)
    qkv, pos = torch.zeros(1, 15 * 64), torch.tensor([0])
    with pytest.raises(ValueError, match="float32"):
        attend(qkv.double(), 9, *caches, pos, *tables, 0.1)
    with pytest.raises(ValueError, match="do not fit"):
        attend(qkv[:, :-64], 9, *caches, pos, *tables, 0.1)
    with pytest.raises(ValueError, match="position"):
        attend(qkv, 9, *caches, pos.int(), *tables, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        attend(qkv, 9, caches[0].transpose(2, 3), caches[1], pos, *tables, 0.1)
    for outside in (-1, 16):  # a write outside the cache is refused before anything runs
        with pytest.raises(ValueError, match=r"positions must lie in \[0, 16\)"):
            attend(qkv + 1, 9, *caches, torch.tensor([outside]), *tables, 0.1)
    assert not caches[0].any() and not caches[1].any()
    with pytest.raises(ValueError, match="unsupported shape"):
        small = torch.zeros(2, 3, 16, 32)
        attend(torch.zeros(1, 15 * 32), 9, small, small.clone(), pos, *rope_tables(16, 32), 0.1)
    assert not native.NativeKernels.supports(9, 3, 32, 576, 1536)
    assert native.NativeKernels.supports(32, 8, 128, 4096, 14336)


@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_adds_in_place_and_normalises(with_delta):
    torch.manual_seed(2)
    x, delta, weight = torch.randn(5, 576) * 3, torch.randn(5, 576), torch.rand(576) + 0.5
    start = x.clone()
    h = kernels().add_rms_norm(x, delta if with_delta else None, weight, 1e-5)
    expected_x = start + delta if with_delta else start
    assert torch.equal(x, expected_x)
    expected = torch.nn.functional.rms_norm(expected_x, (576,), weight, 1e-5)
    assert torch.allclose(h, expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="shapes"):
        kernels().add_rms_norm(x, delta, weight[:-8], 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        kernels().add_rms_norm(x.t(), None, weight, 1e-5)


def test_silu_mul_matches_aten_over_the_whole_range():
    gate = torch.linspace(-100, 100, 4 * 1536).view(4, 1536)
    up = torch.randn(4, 1536)
    got = kernels().silu_mul(torch.cat([gate, up], dim=1))
    assert torch.allclose(got, torch.nn.functional.silu(gate) * up, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels().silu_mul(torch.zeros(2, 24))


def test_switch_off_and_a_missing_compiler_fall_back_to_aten(monkeypatch, caplog):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.load() is None
    native.load.cache_clear()
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(native, "cache_dir", lambda: pytest.fail("must not build"))
    with caplog.at_level("WARNING"):
        assert native.load() is None
    assert "no C compiler" in caplog.text


def test_an_unknown_instruction_set_in_the_switch_falls_back_to_aten_saying_so(monkeypatch, caplog):
    monkeypatch.setenv(native.ISA_SWITCH, "avx10")
    with caplog.at_level("WARNING"):
        assert native.load() is None
    assert "unknown instruction set 'avx10'" in caplog.text
    native.load.cache_clear()
    monkeypatch.setenv(native.ISA_SWITCH, "avx2")
    assert kernels().isa == "avx2"


def test_a_failed_build_names_the_compilers_error(tmp_path, monkeypatch):
    broken = tmp_path / "broken.c"
    broken.write_text("int silu_mul(void) { return syntax error; }\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    with pytest.raises(RuntimeError, match=r"(?s)failed:.*error"):
        native.build(tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.so"))  # no half-written library is left


def test_build_is_cached_by_source(tmp_path):
    first = native.build(tmp_path)
    assert native.build(tmp_path) == first
    assert first.stat().st_size > 0


@pytest.fixture(scope="module")
def hf_model():
    return load_hf_model(smollm2_gguf())


def test_runner_decodes_the_same_logits_natively_and_in_aten(hf_model):
    """Sequences of different lengths in one step: the kernels (each slot's own span) and
    ATen (the longest span, masked) agree within float32 summation order."""
    fast = LlamaRunner(hf_model, 8, 256, torch.float32)
    aten = LlamaRunner(hf_model, 8, 256, torch.float32, native_kernels=False)
    assert fast.native is not None and aten.native is None
    lengths = [3, 9, 16, 17, 40, 41, 63, 100]
    prompts = [[(17 * i + 5 * t) % 4000 + 10 for t in range(n)] for i, n in enumerate(lengths)]
    tokens = [int(x) for x in fast.prefill_batch(list(range(8)), prompts).argmax(-1)]
    aten.prefill_batch(list(range(8)), prompts)
    for step in range(6):
        positions = [n + step for n in lengths]
        got, expected = fast.decode(tokens, positions), aten.decode(tokens, positions)
        assert (got - expected).abs().max().item() < 1e-3
        assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
        tokens = got.argmax(-1).tolist()
    # and one sequence alone, the single-stream step
    alone = [lengths[0] + 6]
    assert torch.allclose(fast.decode(tokens[:1], alone), aten.decode(tokens[:1], alone), atol=1e-3)


def test_asking_for_the_kernels_where_it_cannot_load_is_an_error(hf_model, monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    with pytest.raises(RuntimeError, match="native kernels were asked for"):
        LlamaRunner(hf_model, 1, 16, torch.float32, native_kernels=True)
    assert LlamaRunner(hf_model, 1, 16, torch.float32).native is None


def _packed(dtype: torch.dtype, weight: torch.Tensor) -> native.PackedWeight:
    if dtype == torch.int8:
        q, scales = quantize_int8(weight)
        return kernels().pack(q.t(), torch.int8, scales)
    return kernels().pack(weight, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
@pytest.mark.parametrize("cols", [48, 40])  # 40: a last panel padded with zero columns
def test_matmul_is_the_packed_weights_product_at_every_row_count(dtype, cols):
    torch.manual_seed(0)
    weight = torch.randn(96, cols) * torch.linspace(0.05, 2.0, cols)
    packed = _packed(dtype, weight)
    assert packed.dtype == dtype and packed.numel() == 96 * cols
    assert packed.panels.shape == (3, 96, 16)
    if dtype == torch.float32:
        assert torch.equal(packed.unpack(), weight)
    else:  # the weight the product really uses: bfloat16's or int8's rounding of it
        assert ((packed.unpack() - weight).abs() <= weight.abs().amax(0) / 200).all()
    for rows in (0, 1, 2, 3, 5, 6, 7, 13, 16, 40):
        x = torch.randn(rows, 96)
        got = packed.matmul(x)
        assert got.shape == (rows, cols) and got.dtype == torch.float32
        exact = (x.double() @ packed.unpack().double()).float()
        assert torch.allclose(got, exact, atol=1e-4, rtol=1e-5), rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_matmul_gives_each_row_the_same_bits_alone_or_batched_on_any_thread_count(dtype):
    """Each output is one FMA chain in a fixed order: no dependence on the row count, the
    tile a row lands in, or the threads (what makes batched greedy decoding equal alone)."""
    torch.manual_seed(1)
    packed = _packed(dtype, torch.randn(576, 960) * 0.05)
    x = torch.randn(16, 576)
    together = packed.matmul(x)
    alone = torch.cat([packed.matmul(x[i : i + 1]) for i in range(16)])
    assert torch.equal(together, alone)
    assert torch.equal(packed.matmul(x[3:11]), together[3:11])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(packed.matmul(x), together)
    finally:
        torch.set_num_threads(threads)
    strided = torch.randn(16, 1200)[:, :576]  # rows of a wider tensor, not copied
    assert torch.equal(packed.matmul(strided), packed.matmul(strided.contiguous()))


def _cpu_has_avx512() -> bool:
    text = Path("/proc/cpuinfo").read_text()
    return "avx512f" in next(ln for ln in text.splitlines() if ln.startswith("flags")).split()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_avx512_products_give_the_avx2_products_bits(dtype, monkeypatch):
    """The same chains on wider registers: where the CPU has AVX-512 it is the default and
    its products equal the AVX2 ones to the bit, at every row count and tile split; where
    it has not, asking for it is an error, not a crash."""
    loaded = kernels()
    assert loaded.isa == loaded.available[-1]
    avx2 = loaded.with_isa("avx2")
    with pytest.raises(ValueError, match="unknown instruction set"):
        loaded.with_isa("avx10")
    monkeypatch.setenv(native.ISA_SWITCH, "avx2")
    assert native.NativeKernels(avx2._library).isa == "avx2"
    if not _cpu_has_avx512():
        assert loaded.available == ("avx2",)
        with pytest.raises(ValueError, match="no avx512"):
            loaded.with_isa("avx512")
        return
    wide = loaded.with_isa("avx512")
    torch.manual_seed(2)
    for cols in (48, 40, 960):  # an odd number of panels: the last unit has one
        packed = _packed(dtype, torch.randn(576, cols) * 0.05)
        for rows in (0, 1, 2, 3, 8, 12, 13, 16, 25, 40, 150):
            x = torch.randn(rows, 576)
            assert torch.equal(wide.matmul(x, packed), avx2.matmul(x, packed)), (cols, rows)


def test_matmul_and_pack_reject_what_they_cannot_multiply():
    packed = kernels().pack(torch.randn(64, 32))
    with pytest.raises(ValueError, match="columns"):
        packed.matmul(torch.randn(2, 65))
    with pytest.raises(ValueError, match="float32"):
        packed.matmul(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32"):
        packed.matmul(torch.randn(64))
    with pytest.raises(ValueError, match="non-empty"):
        kernels().pack(torch.randn(0, 16))
    with pytest.raises(ValueError, match="float16"):
        kernels().pack(torch.randn(64, 32), torch.float16)
    with pytest.raises(ValueError, match="one scale per column"):
        kernels().pack(torch.zeros(64, 32, dtype=torch.int8), torch.int8)
    with pytest.raises(ValueError, match="one scale per column"):
        kernels().pack(torch.randn(64, 32), torch.int8, torch.ones(32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_runner_logits_are_the_same_bits_decoded_alone_or_beside_others(hf_model, dtype):
    """Greedy decoding is batch-invariant to the bit in every dtype on the kernels: a
    sequence's prefill and decode logits do not depend on what shares its step."""
    lengths = [5, 12, 30]
    prompts = [[(13 * i + 7 * t) % 4000 + 10 for t in range(n)] for i, n in enumerate(lengths)]
    batched = LlamaRunner(hf_model, 3, 64, dtype)
    assert batched.native is not None
    first = batched.prefill_batch([0, 1, 2], prompts)
    tokens = first.argmax(-1).tolist()
    steps = [batched.decode(tokens, lengths)]
    steps.append(batched.decode(steps[0].argmax(-1).tolist(), [n + 1 for n in lengths]))
    for b, ids in enumerate(prompts):
        alone = LlamaRunner(hf_model, 1, 64, dtype)
        assert torch.equal(alone.prefill(0, ids), first[b])
        assert torch.equal(alone.decode([tokens[b]], [lengths[b]])[0], steps[0][b])
        again = [int(steps[0][b].argmax())]
        assert torch.equal(alone.decode(again, [lengths[b] + 1])[0], steps[1][b])
