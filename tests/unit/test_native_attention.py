"""The native decode-attention kernel against the ATen path it replaces, and its fallbacks."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from serving.assets import smollm2_gguf
from serving.llm import native
from serving.llm.runner import LlamaRunner, load_hf_model

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


def kernel() -> native.NativeAttention:
    loaded = native.load()
    assert loaded is not None, "the kernel should build on an x86-64 AVX2 machine with cc"
    return loaded


def reference(q, k, v, k_cache, v_cache, positions, scale):
    """Per slot, the textbook computation on the slot's own span (no batching, no mask)."""
    out = []
    group = q.shape[1] // k_cache.shape[1]
    for b, pos in enumerate(positions.tolist()):
        k_cache[b, :, pos] = k[b]
        v_cache[b, :, pos] = v[b]
        keys = k_cache[b, :, : pos + 1].repeat_interleave(group, dim=0)  # [heads, T, d]
        values = v_cache[b, :, : pos + 1].repeat_interleave(group, dim=0)
        weights = torch.softmax(q[b].unsqueeze(1) @ keys.transpose(1, 2) * scale, dim=-1)
        out.append((weights @ values).reshape(-1))
    return torch.stack(out)


pytestmark = pytest.mark.skipif(not BUILDABLE, reason="needs x86-64 with AVX2 and a C compiler")


@pytest.mark.parametrize(("kv_heads", "group", "head_dim"), [(3, 3, 64), (2, 4, 128), (1, 1, 64)])
def test_kernel_matches_the_textbook_attention_and_writes_the_cache(kv_heads, group, head_dim):
    torch.manual_seed(0)
    slots, context = 6, 80
    # lengths 1, 8, 9 (block edges), 17, 64 and 80 (the whole context)
    positions = torch.tensor([0, 7, 8, 16, 63, 79])
    n = len(positions)
    k_cache = torch.randn(slots, kv_heads, context, head_dim)
    v_cache = torch.randn(slots, kv_heads, context, head_dim)
    # q, k, v as the runner passes them: strided views into one fused projection row
    fused = torch.randn(n, (kv_heads * group + 2 * kv_heads) * head_dim + 5)
    q = fused[:, : kv_heads * group * head_dim].view(n, kv_heads * group, head_dim)
    k = fused[:, q[0].numel() :][:, : kv_heads * head_dim].view(n, kv_heads, head_dim)
    v = fused[:, q[0].numel() + k[0].numel() :][:, : kv_heads * head_dim]
    v = v.view(n, kv_heads, head_dim)
    scale = head_dim**-0.5

    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected = reference(q, k, v, expected_k, expected_v, positions, scale)
    got = kernel()(q, k, v, k_cache, v_cache, positions, scale)

    assert got.shape == (n, kv_heads * group * head_dim)
    assert torch.allclose(got, expected, atol=2e-6, rtol=1e-5)
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


def test_kernel_ignores_what_lies_past_each_slots_position():
    torch.manual_seed(1)
    k_cache, v_cache = torch.randn(2, 3, 32, 64), torch.randn(2, 3, 32, 64)
    q, k, v = torch.randn(2, 9, 64), torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    positions = torch.tensor([4, 20])
    first = kernel()(q, k, v, k_cache, v_cache, positions, 0.125)
    k_cache[0, :, 5:] = float("nan")  # never written memory may hold anything
    v_cache[0, :, 5:] = float("inf")
    second = kernel()(q, k, v, k_cache, v_cache, positions, 0.125)
    assert torch.equal(first, second)


def test_kernel_rejects_what_it_cannot_read():
    attend = kernel()
    caches = torch.zeros(2, 3, 16, 64), torch.zeros(2, 3, 16, 64)
    q, k, v = torch.zeros(1, 9, 64), torch.zeros(1, 3, 64), torch.zeros(1, 3, 64)
    with pytest.raises(ValueError, match="float32"):
        attend(q.double(), k, v, *caches, torch.tensor([0]), 0.1)
    with pytest.raises(ValueError, match="position"):
        attend(q, k, v, *caches, torch.tensor([0], dtype=torch.int32), 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        attend(q, k, v, caches[0].transpose(2, 3), caches[1], torch.tensor([0]), 0.1)
    small = torch.zeros(1, 9, 32), torch.zeros(1, 3, 32), torch.zeros(1, 3, 32)
    with pytest.raises(ValueError, match="unsupported shape"):
        attend(*small, torch.zeros(2, 3, 16, 32), torch.zeros(2, 3, 16, 32), torch.tensor([0]), 0.1)
    assert not native.NativeAttention.supports(heads=9, kv_heads=3, head_dim=32)
    assert native.NativeAttention.supports(heads=32, kv_heads=8, head_dim=128)


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


def test_a_failed_build_names_the_compilers_error(tmp_path, monkeypatch):
    broken = tmp_path / "broken.c"
    broken.write_text("int decode_attention(void) { return syntax error; }\n")
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
    """Sequences of different lengths in one step: the kernel (each slot's own span) and
    ATen (the longest span, masked) agree within float32 summation order."""
    fast = LlamaRunner(hf_model, 8, 256, torch.float32)
    aten = LlamaRunner(hf_model, 8, 256, torch.float32, native_attention=False)
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


def test_asking_for_the_kernel_where_it_cannot_load_is_an_error(hf_model, monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    with pytest.raises(RuntimeError, match="native decode attention"):
        LlamaRunner(hf_model, 1, 16, torch.float32, native_attention=True)
    assert LlamaRunner(hf_model, 1, 16, torch.float32).native is None
