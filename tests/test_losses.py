"""Contrastive losses: hand-computed references, single-process gather == plain loss, and the
local-loss-with-gathered-features semantics equal to one big batch (simulated ranks and 2 real processes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from abi_train.losses import all_gather_with_grad, clip_loss, siglip_loss

IMG = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TXT = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
SCALE = torch.tensor(2.0)


def test_clip_loss_hand_computed():
    # logits = 2 * IMG @ TXT.T = [[2, 1.2], [0, 1.6]]; text->image uses its transpose [[2, 0], [1.2, 1.6]].
    e = math.exp
    i2t = -math.log(e(2) / (e(2) + e(1.2))) - math.log(e(1.6) / (e(0) + e(1.6)))
    t2i = -math.log(e(2) / (e(2) + e(0))) - math.log(e(1.6) / (e(1.2) + e(1.6)))
    want = (i2t / 2 + t2i / 2) / 2
    assert clip_loss(IMG, TXT, SCALE).item() == pytest.approx(want, rel=1e-6)


def test_siglip_loss_hand_computed():
    # logits = 2 * [[1, 0.6], [0, 0.8]] - 1 = [[1, 0.2], [-1, 0.6]]; -log sigmoid(z) = log(1 + exp(-z))
    # on the diagonal (matches), log(1 + exp(z)) elsewhere; summed and divided by the 2 images.
    softplus = lambda x: math.log1p(math.exp(x))
    want = (softplus(-1) + softplus(0.2) + softplus(-1) + softplus(-0.6)) / 2
    got = siglip_loss(IMG, TXT, SCALE, torch.tensor(-1.0))
    assert got.item() == pytest.approx(want, rel=1e-6)


def _features(n: int = 8, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img.requires_grad_(), txt.requires_grad_()


def _plain_clip(img, txt, scale):
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _plain_siglip(img, txt, scale, bias):
    logits = scale * img @ txt.T + bias
    targets = torch.eye(len(img))
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(img)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_single_process_gather_equals_plain_loss_and_grads(kind):
    assert all_gather_with_grad(IMG) is IMG  # no process group: identity
    img, txt = _features()
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    ours = clip_loss(img, txt, scale) if kind == "clip" else siglip_loss(img, txt, scale, bias)
    got = torch.autograd.grad(ours, (img, txt, scale))
    plain = _plain_clip(img, txt, scale) if kind == "clip" else _plain_siglip(img, txt, scale, bias)
    want = torch.autograd.grad(plain, (img, txt, scale))
    assert ours.item() == pytest.approx(plain.item(), rel=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_simulated_ranks_equal_one_big_batch(kind):
    """W ranks, each scoring its rows against gathered columns; DDP averages the per-rank gradients.
    The gather's backward sums over ranks, so d(mean over ranks of the local losses) is what DDP applies."""
    world, local = 4, 3
    img, txt = _features(world * local)
    scale, bias = torch.tensor(5.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)

    def loss(i, t, r):
        gather_img = lambda x: torch.cat([x if q == r else img[q * local : (q + 1) * local] for q in range(world)])
        gather_txt = lambda x: torch.cat([x if q == r else txt[q * local : (q + 1) * local] for q in range(world)])
        if kind == "clip":
            gather = lambda x: gather_img(x) if x is i else gather_txt(x)
            return clip_loss(i, t, scale, gather=gather, rank=r)
        return siglip_loss(i, t, scale, bias, gather=gather_txt, rank=r)

    shards = [(img[r * local : (r + 1) * local], txt[r * local : (r + 1) * local]) for r in range(world)]
    mean = sum(loss(i, t, r) for r, (i, t) in enumerate(shards)) / world
    big = _plain_clip(img, txt, scale) if kind == "clip" else _plain_siglip(img, txt, scale, bias)
    assert mean.item() == pytest.approx(big.item(), rel=1e-6)
    got, want = torch.autograd.grad(mean, (img, txt, scale)), torch.autograd.grad(big, (img, txt, scale))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def _worker(rank: int, world: int, init_file: str, kind: str, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        img, txt = _features(8)
        local = slice(rank * 4, (rank + 1) * 4)
        i, t = img[local].detach().requires_grad_(), txt[local].detach().requires_grad_()
        scale = torch.tensor(5.0, requires_grad=True)
        loss = clip_loss(i, t, scale) if kind == "clip" else siglip_loss(i, t, scale, torch.tensor(-2.0))
        loss.backward()
        grads = [i.grad / world, t.grad / world, scale.grad / world]  # DDP's average over ranks
        results[rank] = (loss.item(), [g.clone() for g in grads])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_processes_equal_one_batch_of_twice_the_size(tmp_path, kind):
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, str(tmp_path / "init"), kind, results), nprocs=world)
        results = dict(results)
    img, txt = _features(8)
    scale = torch.tensor(5.0, requires_grad=True)
    big = _plain_clip(img, txt, scale) if kind == "clip" else _plain_siglip(img, txt, scale, -2.0)
    g_img, g_txt, g_scale = torch.autograd.grad(big, (img, txt, scale))
    assert sum(results[r][0] for r in range(world)) / world == pytest.approx(big.item(), rel=1e-6)
    for r in range(world):
        torch.testing.assert_close(results[r][1][0], g_img[r * 4 : (r + 1) * 4])
        torch.testing.assert_close(results[r][1][1], g_txt[r * 4 : (r + 1) * 4])
    torch.testing.assert_close(sum(results[r][1][2] for r in range(world)), g_scale)
