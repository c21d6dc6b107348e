"""Every shipped model config builds a ``models.Model``: the protocol the trainer, transforms, FSDP2 and the
exporters rely on (config rebuilds the same model, blocks, FLOPs, LoRA targets, freeze groups)."""

from __future__ import annotations

import fnmatch

import pytest
import torch
import yaml

from abi_train.cli import config_dir
from abi_train.models import Model, build_model

MODELS = sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))


@pytest.mark.parametrize("name", MODELS)
def test_every_model_keeps_the_protocol(name):
    config = yaml.safe_load((config_dir() / "model" / f"{name}.yaml").read_text())
    for key, value in (("vocab_size", 128), ("eot_id", 127), ("num_classes", 10)):  # the tasks fill these in
        if key in config and config[key] is None:
            config[key] = value
    with torch.device("meta"):
        model = build_model(config)
        assert isinstance(model, Model)
        assert build_model(model.config).config == model.config  # config rebuilds the same model
    assert len(model.blocks) > 0 and all(isinstance(b, torch.nn.Module) for b in model.blocks)
    assert model.flops_per_item() > 6 * sum(p.numel() for b in model.blocks for p in b.parameters())
    assert {"q", "k", "v", "o", "up", "down"} <= set(model.lora_targets())
    names = [n for n, _ in model.named_parameters()]
    for group, patterns in model.freeze_groups().items():
        assert any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns), group
