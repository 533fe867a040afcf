"""KVQuant calibration capture: the differentiable forward against the engine, the Fisher against
finite differences, reproducible windows, shapes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kvwise.attention import get_backend
from kvwise.cache.kv_manager import KVManager
from kvwise.cache.kv_store import make_kv_store
from kvwise.calibration.capture import (
    capture_kv_activations,
    decoder_forward,
    next_token_nll,
    sample_offsets,
)
from kvwise.engine.runner import ModelRunner
from kvwise.errors import ConfigError, InvalidRequestError
from kvwise.eval.perplexity import prompt_logits
from kvwise.model.config import ModelConfig
from kvwise.model.llama import LlamaModel
from tests.conftest import pydoc_text

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def text_ids(llm) -> list[int]:
    return llm.get_tokenizer().encode(pydoc_text()[:20000], add_special_tokens=False)


def tiny_model(dtype: torch.dtype, bias: bool, seed: int = 0) -> LlamaModel:
    """3 layers, GQA (4 query heads on 2 KV heads), random weights; Qwen2-style qkv bias."""
    cfg = ModelConfig("qwen2" if bias else "llama", vocab_size=64, hidden_size=32,
                      intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                      head_dim=8, max_position_embeddings=128, attention_bias=bias)
    model = LlamaModel(cfg, cfg.max_position_embeddings)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.3 * noise)
    model = model.to(dtype)
    model.build_rope()
    return model.eval()


def tiny_engine(model: LlamaModel, budget: int) -> SimpleNamespace:
    """What `prompt_logits` reads of an engine, around a model built in the test."""
    kv = make_kv_store("float32", model.cfg, 16, 4, torch.float32, CPU)
    return SimpleNamespace(kv_manager=KVManager(16, 4, False), device=CPU,
                           runner=ModelRunner(model, kv, get_backend("paged"), CPU),
                           config=SimpleNamespace(max_num_batched_tokens=budget))


def test_forward_matches_engine_logits(llm, text_ids):
    """(a) SmolLM2 fp32: the autograd forward's logits are the engine's own (paged cache,
    numba kernels), position by position, for 24 tokens."""
    ids = text_ids[100:124]
    ref = prompt_logits(llm.engine, ids)  # [24, V]
    with torch.no_grad():
        ours = decoder_forward(llm.engine.model, torch.tensor(ids))  # [24, V]
    diff = (ours - ref).abs().max().item()
    print(f"max |logit diff| = {diff:.3g} (logits up to {ref.abs().max().item():.1f})")
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert diff < 1.5e-4  # measured 4e-5..8e-5 on 10 windows: fp32 rounding of logits ~35


def test_forward_matches_engine_with_bias_and_gqa():
    """The bias and GQA paths SmolLM2 lacks (Qwen2 q/k/v bias, 2 query heads per KV head),
    against the engine's forward prefilled in 2 chunks of 10 through the paged cache."""
    model = tiny_model(torch.float32, bias=True)
    ids = list(torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(1)))
    ids = [int(i) for i in ids]
    ref = prompt_logits(tiny_engine(model, budget=10), ids)  # [20, V]
    with torch.no_grad():
        ours = decoder_forward(model, torch.tensor(ids))
    diff = (ours - ref).abs().max().item()
    print(f"max |logit diff| = {diff:.3g}")
    assert diff < 3e-5  # measured 6e-6


def _loss(model: LlamaModel, ids: torch.Tensor, layer: int, which: str,
          index: tuple[int, int, int], eps: float) -> float:
    """The sample's loss with element `index` [pos, head, dim] of layer's pre-RoPE k or v
    moved by eps."""
    def hook(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if i == layer:
            t = (k if which == "k" else v).clone()
            t[index] += eps
            k, v = (t, v) if which == "k" else (k, t)
        return k, v

    with torch.no_grad():
        return next_token_nll(decoder_forward(model, ids, hook), ids).item()


def test_fisher_matches_finite_differences():
    """(b) Fisher = (dL/da)^2 against central differences of the loss in float64, for k and v
    elements of the first layer (whose gradient runs through every later layer's k and v: a
    capture that cut those paths fails here) and of the last. The last position's k and v
    reach no predicted token: their Fisher is exactly 0."""
    model = tiny_model(torch.float64, bias=True)
    ids = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(2))
    (act0, _, act2) = capture_kv_activations(model, ids.tolist(), 1, 12, seed=0, progress=False)
    eps = 1e-5
    cases = [(0, "v", tuple(int(i) for i in torch.nonzero(act0.v_fisher[0] ==
                                                       act0.v_fisher[0].max())[0])),
             (0, "k", (3, 1, 2)), (0, "v", (5, 0, 7)), (2, "k", (7, 1, 0)), (2, "v", (1, 0, 4))]
    for layer, which, index in cases:
        fd = (_loss(model, ids, layer, which, index, eps)
              - _loss(model, ids, layer, which, index, -eps)) / (2 * eps)
        act = act0 if layer == 0 else act2
        fisher = (act.k_fisher if which == "k" else act.v_fisher)[0][index].item()
        print(f"layer {layer} {which}{list(index)}: fisher={fisher:.6e} fd^2={fd * fd:.6e}")
        assert fd * fd > 1e-8  # a real gradient, not two zeros
        assert fisher == pytest.approx(fd * fd, rel=1e-5)
    for act in (act0, act2):
        assert torch.all(act.k_fisher[0, -1] == 0) and torch.all(act.v_fisher[0, -1] == 0)
        assert torch.all(act.v_fisher[0, :-1].sum(dim=(1, 2)) > 0)


def test_capture_is_reproducible(llm, text_ids):
    """(c) The same seed gives bit-identical tensors; another seed other windows."""
    model = llm.engine.model
    a = capture_kv_activations(model, text_ids, 2, 16, seed=3, progress=False)
    b = capture_kv_activations(model, text_ids, 2, 16, seed=3, progress=False)
    c = capture_kv_activations(model, text_ids, 2, 16, seed=4, progress=False)
    assert sample_offsets(len(text_ids), 2, 16, 3) != sample_offsets(len(text_ids), 2, 16, 4)
    for x, y, z in zip(a, b, c):
        for name in ("k", "v", "k_fisher", "v_fisher"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
            assert not torch.equal(getattr(x, name), getattr(z, name)), name


def test_capture_shapes_and_windows(llm, text_ids):
    """(d) One LayerActivations per layer, [S, C, K, D] float32 CPU tensors; sample s holds the
    k projection (before RoPE) of the window at sample_offsets(...)[s]."""
    model = llm.engine.model
    cfg = model.cfg
    layers = capture_kv_activations(model, text_ids, 2, 12, seed=0, progress=False)
    assert len(layers) == cfg.num_layers == 30
    for act in layers:
        for t in (act.k, act.v, act.k_fisher, act.v_fisher):
            assert t.shape == (2, 12, cfg.num_kv_heads, cfg.head_dim) == (2, 12, 3, 64)
            assert t.dtype == torch.float32 and t.device == CPU and torch.isfinite(t).all()
        assert (act.k_fisher >= 0).all() and act.k_fisher.sum() > 0 and act.v_fisher.sum() > 0
    layer = model.layers[0]
    w_k = layer.qkv.weight_t[:, layer.q_size:layer.q_size + layer.kv_size]  # [E, K*D]
    for s, offset in enumerate(sample_offsets(len(text_ids), 2, 12, 0)):
        x = model.embed.weight[text_ids[offset:offset + 12]]  # [12, E]
        k = F.rms_norm(x, (x.shape[-1],), layer.input_norm, cfg.rms_norm_eps) @ w_k
        torch.testing.assert_close(layers[0].k[s], k.view(12, 3, 64), rtol=0, atol=1e-5)


def test_sample_offsets_disjoint_reproducible_and_checked():
    for seed in range(20):
        offsets = sample_offsets(1000, 7, 128, seed)
        assert offsets == sample_offsets(1000, 7, 128, seed)
        assert all(b >= a + 128 for a, b in zip(offsets, offsets[1:])), offsets
        assert offsets[0] >= 0 and offsets[-1] + 128 <= 1000
    assert sample_offsets(256, 2, 128, 5) == [0, 128]  # exactly full: no slack
    assert len({tuple(sample_offsets(1000, 7, 128, s)) for s in range(20)}) > 10
    overlapping = sample_offsets(300, 4, 128, 0)  # 4 x 128 > 300: independent draws
    assert len(overlapping) == 4 and all(0 <= o <= 300 - 128 for o in overlapping)
    with pytest.raises(InvalidRequestError, match="fewer than one sample"):
        sample_offsets(100, 1, 128, 0)
    with pytest.raises(InvalidRequestError, match="num_samples"):
        sample_offsets(1000, 0, 128, 0)
    with pytest.raises(InvalidRequestError, match="context_len"):
        sample_offsets(1000, 1, 1, 0)


def test_capture_refuses_quantized_projections_and_long_windows():
    model = tiny_model(torch.float32, bias=False)
    with pytest.raises(InvalidRequestError, match="context_len"):
        capture_kv_activations(model, list(range(64)) * 4, 1, 129, 0, progress=False)
    model.lm_head = torch.nn.Linear(32, 64)  # stands in for a quantized head
    with pytest.raises(ConfigError, match="weight_dtype"):
        capture_kv_activations(model, list(range(64)), 1, 16, 0, progress=False)
