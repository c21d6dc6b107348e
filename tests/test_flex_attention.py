"""flex_attention (models/flex.py) computes what the dense paths compute: causal, sliding windows past the
window, packed documents (with a window inside each), soft-capped scores, GQA. (PyTorch's flex_attention has
no backward on CPU: gradients are compared on CUDA, where the trainer uses it, by the same test.)"""

from __future__ import annotations

import pytest
import torch

from abi_train.models import build_model

BASE = {"arch": "gpt", "style": "llama", "vocab_size": 96, "context_length": 64, "n_layer": 3, "n_head": 4}
BASE |= {"n_kv_head": 2, "d_model": 32}
CASES = {
    "causal": {},
    "sliding": {"sliding_window": 5, "layer_types": ["sliding", "full", "sliding"]},
    "softcap": {"attn_softcap": 0.5, "sliding_window": 6, "layer_types": ["full", "sliding", "full"]},
}


def segments_of(lengths: list[int], total: int) -> torch.Tensor:
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    return torch.cat([ids, torch.full((total - len(ids),), len(lengths))])  # padding: a segment of its own


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_flex_equals_the_dense_path(case, packed):
    torch.manual_seed(0)
    model = build_model(BASE | CASES[case])
    idx = torch.randint(0, 96, (2, 40))
    kwargs = {}
    if packed:
        segments = torch.stack([segments_of([13, 20], 40), segments_of([7, 9, 17], 40)])
        positions = torch.stack([
            torch.cat([torch.arange(13), torch.arange(20), torch.arange(7)]),
            torch.cat([torch.arange(7), torch.arange(9), torch.arange(17), torch.arange(7)]),
        ])  # fmt: skip
        kwargs = {"segments": segments, "positions": positions}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, idx = model.to(device), idx.to(device)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    train = device == "cuda"  # flex_attention's backward runs on CUDA only
    with torch.set_grad_enabled(train):
        dense = model(idx, **kwargs)
        if train:
            dense.square().mean().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad()
        model.flex_attention = "on"
        flexed = model(idx, **kwargs)
        torch.testing.assert_close(flexed, dense, rtol=1e-4, atol=1e-4)
        if train:
            flexed.square().mean().backward()
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.grad, grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_compiled_mode_is_eager_outside_compile():
    """flex_attention="compiled" (the trainer's choice under torch.compile) leaves eager calls on SDPA."""
    torch.manual_seed(0)
    model = build_model(BASE | CASES["sliding"])
    idx = torch.randint(0, 96, (1, 30))
    dense = model(idx)
    model.flex_attention = "compiled"
    assert torch.equal(model(idx), dense)
