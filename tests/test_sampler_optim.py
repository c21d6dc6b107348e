"""The shared batch order and the optimizer/schedule pieces of the trainer."""

import pytest
import torch
from omegaconf import OmegaConf

from abi_train.data.sampler import GlobalBatchSampler
from abi_train.errors import UserError
from abi_train.optim import build_scheduler, lr_factor, param_groups
from abi_train.trainer import accumulation_steps


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_global_order_is_independent_of_world_size_and_accumulation():
    one = take(GlobalBatchSampler(50, 8, seed=3), 10)  # 10 steps of 8
    flat_one = [i for b in one for i in b]
    # 2 ranks x 2 micro-steps of 2: interleave back into global order per step
    ranks = [take(GlobalBatchSampler(50, 8, accumulation=2, rank=r, world_size=2, seed=3), 20) for r in range(2)]
    flat_two = []
    for step in range(10):
        for micro in range(2):
            for r in range(2):
                flat_two += ranks[r][step * 2 + micro]
    assert flat_one == flat_two


def test_resume_continues_the_same_order():
    full = take(GlobalBatchSampler(13, 4, seed=0), 9)
    resumed = take(GlobalBatchSampler(13, 4, seed=0, start_step=5), 4)
    assert full[5:] == resumed


def test_epochs_are_permutations():
    flat = [i for b in take(GlobalBatchSampler(12, 4, seed=1), 6) for i in b]
    assert sorted(flat[:12]) == list(range(12)) and sorted(flat[12:]) == list(range(12))
    assert flat[:12] != flat[12:]  # reshuffled each epoch


def test_accumulation_steps():
    assert accumulation_steps(4, None, 2) == 1
    assert accumulation_steps(4, 32, 2) == 4
    with pytest.raises(UserError, match="global_batch_size"):
        accumulation_steps(4, 30, 2)
    with pytest.raises(UserError, match="batch_size"):
        accumulation_steps(0, None, 1)


def test_no_weight_decay_on_norms_biases_embeddings():
    model = torch.nn.ModuleDict(
        {"tok_embd": torch.nn.Embedding(10, 4), "lin": torch.nn.Linear(4, 4), "norm": torch.nn.LayerNorm(4)}
    )
    model.register_parameter("position_embd", torch.nn.Parameter(torch.zeros(3, 4)))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 5 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules(schedule):
    cfg = OmegaConf.create({"schedule": schedule, "warmup_steps": 10, "min_lr_ratio": 0.1, "decay_fraction": 0.2})
    f = [lr_factor(s, cfg, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    if schedule == "constant":
        assert f[-1] == 1.0
    else:
        assert f[-1] == pytest.approx(0.1, abs=0.01) and min(f) >= 0.1 - 1e-9
    if schedule == "wsd":
        assert f[50] == 1.0 and f[79] == 1.0 and f[85] < 1.0


def test_unknown_schedule_is_a_user_error():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = OmegaConf.create({"schedule": "linear", "warmup_steps": 0})
    with pytest.raises(UserError, match="optim.schedule='linear'.*cosine, wsd, constant"):
        build_scheduler(opt, cfg, 10)
