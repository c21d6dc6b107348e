"""LoRA and partial freezing (abi_train.lora) in the shared trainer: identity at step 0, merge, a frozen base,
adapter-only checkpoints, exact resume, and the bad inputs. The adapter files against PEFT and llama.cpp are
tests/test_lora_export.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLM, compose_cfg, losses, read_metrics, run_abi

from abi_train import checkpoint as ckpt
from abi_train import sources
from abi_train.distributed import DistInfo
from abi_train.errors import UserError
from abi_train.lora import LoRAConfig, LoRALinear, apply_lora, freeze, lora_layers, merged
from abi_train.models import build_model
from abi_train.tasks import task_class
from abi_train.trainer import Trainer

LLAMA = {"arch": "gpt", "style": "llama", "vocab_size": 96, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32}
GPT2 = {**LLAMA, "style": "gpt2", "n_kv_head": None}
VIT = {
    "arch": "vit",
    "image_size": 16,
    "patch_size": 8,
    "width": 32,
    "depth": 2,
    "heads": 2,
    "num_classes": 0,
}  # features (a fresh head is zero)


def trainer_for(tmp_path: Path, cache_dir: Path, overrides: list[str], name: str) -> Trainer:
    cfg = compose_cfg([*TINY_LLM, f"data.cache_dir={cache_dir}", "trainer.progress=false", *overrides])
    return Trainer(cfg, task_class(cfg.task)(cfg, DistInfo()), tmp_path / name, DistInfo())


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, cache_dir) -> Path:
    """A tiny pretrained LLM (an abi_train run) that the LoRA runs adapt."""
    tmp = tmp_path_factory.mktemp("lora_base")
    trainer_for(tmp, cache_dir, ["trainer.max_steps=4", "trainer.ckpt_every=4"], "base").fit()
    return tmp / "base"


def lora_run(tmp_path, cache_dir, base_run, extra: list[str], name: str = "lora") -> Trainer:
    trainer = trainer_for(
        tmp_path,
        cache_dir,
        [
            f"init_from={base_run}",
            "adapter=lora",
            "adapter.rank=4",
            "optim.lr=1e-2",
            "trainer.max_steps=6",
            "trainer.ckpt_every=3",
            *extra,
        ],
        name,
    )
    trainer.fit()
    return trainer


def randomize_b(model: torch.nn.Module) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for b in layer.lora_b.values():
                b.normal_(0, 0.1)


@pytest.mark.parametrize("config", [LLAMA, GPT2, VIT], ids=["llama", "gpt2", "vit"])
def test_zero_b_is_the_identity_and_merging_is_exact(config):
    torch.manual_seed(0)
    model = build_model(config).eval()
    x = torch.randint(0, 96, (2, 12)) if config["arch"] == "gpt" else torch.randn(2, 3, 16, 16)
    before = model(x)
    adapted = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("all",)))
    per_block = 5 if config.get("style") == "llama" else 4  # qkv, proj and the MLP's linears (SwiGLU: three)
    assert len(adapted) == per_block * config.get("n_layer", config.get("depth"))
    assert torch.equal(model(x), before)  # B = 0: exactly the base model
    randomize_b(model)
    after = model(x)
    assert not torch.allclose(after, before, atol=1e-3)
    plain = merged(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert sorted(plain.state_dict()) == sorted(build_model(config).state_dict())  # the base's names
    torch.testing.assert_close(plain(x), after, atol=1e-5, rtol=1e-5)


def test_targets_slice_the_fused_qkv():
    """q and v only: two updates inside attn.qkv, k's rows untouched; rsLoRA scales by alpha / sqrt(rank)."""
    torch.manual_seed(0)
    model = build_model(LLAMA)
    cfg = LoRAConfig(rank=4, alpha=8, targets=("q", "v"), rslora=True)
    assert apply_lora(model, cfg) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    layer = model.blocks[0].attn.qkv
    assert layer.slices == {"q": (0, 32), "v": (48, 64)} and layer.scale == 8 / 2
    randomize_b(model)
    delta = layer.delta_weight()
    assert delta[32:48].abs().max() == 0 and delta[:32].abs().max() > 0 and delta[48:].abs().max() > 0
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), x @ (layer.weight + delta).T, atol=1e-5, rtol=1e-5)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        f"blocks.{i}.attn.qkv.lora_{ab}.{t}" for i in range(2) for ab in "ab" for t in "qv"
    )  # the base is frozen


def test_bad_targets_name_what_exists():
    with pytest.raises(UserError, match=r"adapter.targets: 'qq' is not a LoRA target; valid: q k v o gate up down"):
        LoRAConfig(targets=("qq",))
    with pytest.raises(
        UserError, match=r"adapter.targets: gate matches no layer of this model; it has: q k v o up down"
    ):
        apply_lora(build_model(GPT2), LoRAConfig(targets=("q", "gate")))
    with pytest.raises(UserError, match=r"adapter.rank=0 must be a positive integer"):
        LoRAConfig(rank=0)


def test_freeze_patterns_and_groups():
    model = build_model(LLAMA)
    frozen = freeze(model, ["tok_embd.*", "blocks.0.*"])
    assert "blocks.0.attn.qkv.weight" in frozen and "tok_embd.weight" in frozen
    assert model.blocks[1].attn.qkv.weight.requires_grad
    with pytest.raises(UserError, match=r"trainer.freeze: 'block.*' matches no parameter; give fnmatch patterns"):
        freeze(build_model(LLAMA), ["block.*"])
    with pytest.raises(UserError, match=r"freezes every parameter; nothing is left to train"):
        freeze(build_model(LLAMA), ["*"])


def test_lora_run_trains_only_the_adapter(tmp_path, cache_dir, base_run):
    """The base is bit-identical after training and not in the optimizer; the checkpoint holds the adapter
    alone and names its base by path and hash; the baseline is evaluated at step 0; merged exports."""
    trainer = lora_run(tmp_path, cache_dir, base_run, ["trainer.eval_every=3", "export=gguf", "export.adapter=false"])
    base_state = ckpt.read_state_dict(ckpt.latest_checkpoint(base_run) / "model.safetensors")
    own = trainer.raw_model.state_dict()
    for name, tensor in base_state.items():
        assert torch.equal(own[name], tensor), name
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    names = {n for n, p in trainer.raw_model.named_parameters() if id(p) in in_optimizer}
    assert names and all(".lora_" in n for n in names)
    assert all(
        not torch.equal(b, torch.zeros_like(b)) for _, m in lora_layers(trainer.raw_model) for b in m.lora_b.values()
    )

    last = ckpt.latest_checkpoint(trainer.run_dir)
    assert not (last / "model.safetensors").exists()
    assert set(ckpt.read_state_dict(last / "adapter.safetensors")) == names
    meta = json.loads((last / "meta.json").read_text())
    assert meta["adapter"]["rank"] == 4 and meta["adapter"]["base"]["init_from"] == str(
        ckpt.latest_checkpoint(base_run)
    )
    assert len(meta["adapter"]["base"]["sha256"]) == 64
    assert [r["step"] for r in read_metrics(trainer.run_dir) if "val/loss" in r] == [0, 3, 6]

    # load_model rebuilds base + adapter; the GGUF written at the end is the merged model
    model, _ = sources.load_model(trainer.run_dir)
    x = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x), trainer.raw_model.eval()(x))
    from abi_train.gguf_reader import read_gguf

    from_gguf, _, _ = read_gguf(trainer.run_dir / "model.gguf")
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(x), model(x), atol=2e-2, rtol=2e-2)  # f16 file


def test_lora_exact_resume(tmp_path, cache_dir, base_run):
    full = lora_run(tmp_path, cache_dir, base_run, [], "full")
    part = lora_run(tmp_path, cache_dir, base_run, ["trainer.stop_at_step=3", "resume=auto"], "part")
    assert sorted(losses(part.run_dir)) == [1, 2, 3]
    lora_run(tmp_path, cache_dir, base_run, ["resume=true"], "part")
    assert losses(part.run_dir) == losses(full.run_dir)
    a = ckpt.read_state_dict(ckpt.latest_checkpoint(full.run_dir) / "adapter.safetensors")
    b = ckpt.read_state_dict(ckpt.latest_checkpoint(part.run_dir) / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(UserError, match=r"was trained with adapter .*resume with the same adapter options"):
        lora_run(tmp_path, cache_dir, base_run, ["resume=true", "adapter.rank=8"], "part")


def test_freeze_keeps_frozen_weights(tmp_path, cache_dir, base_run):
    trainer = trainer_for(
        tmp_path,
        cache_dir,
        [f"init_from={base_run}", "trainer.max_steps=2", "trainer.freeze=[tok_embd.*,blocks.0.*]"],
        "f",
    )
    trainer.fit()
    base_state = ckpt.read_state_dict(ckpt.latest_checkpoint(base_run) / "model.safetensors")
    own = trainer.raw_model.state_dict()
    assert torch.equal(own["blocks.0.attn.qkv.weight"], base_state["blocks.0.attn.qkv.weight"])
    assert not torch.equal(own["blocks.1.attn.qkv.weight"], base_state["blocks.1.attn.qkv.weight"])


def test_adapter_cli_refusals(tmp_path, cache_dir, base_run):
    common = [*TINY_LLM, f"data.cache_dir={cache_dir}"]
    cases = [
        (["adapter=lora"], "error: adapter=lora needs init_from=PATH"),
        ([f"init_from={base_run}", "adapter=lora", "adapter.targets=[gate,wq]"], "error: adapter.targets: 'wq'"),
        ([f"init_from={base_run}", "adapter=lora", "+adapter.ranks=2"], "error: unknown adapter key(s) ranks"),
    ]
    for i, (extra, message) in enumerate(cases):
        run = tmp_path / f"bad{i}"
        r = run_abi([*common, *extra, f"hydra.run.dir={run}"])
        assert r.returncode == 2 and r.stderr.startswith(message), r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1 and not run.exists()


VISION = {
    "vit": ["recipe=vit", "data.num_train=128", "data.num_val=32", "trainer.batch_size=16", "trainer.num_workers=0"],
    "clip": ["recipe=clip", "data.num_train=64", "data.num_val=32", "data.num_zero_shot=96", "trainer.batch_size=16"],
}
QUIET = ["trainer.log_every=1", "trainer.eval_every=0", "trainer.progress=false", "optim.warmup_steps=1"]


@pytest.mark.parametrize("family", ["vit", "clip"])
def test_lora_on_vision_models_in_bf16(tmp_path, family):
    """The same adapter on a ViT (with its head trained in full: adapter.also_train) and on both CLIP towers,
    under bf16 autocast: only the adapter (and the head) change; export=gguf writes the merged model and says
    in one line why there is no llama.cpp adapter."""
    common = [*VISION[family], *QUIET]
    base = tmp_path / "base"
    r = run_abi([*common, "trainer.max_steps=2", "trainer.ckpt_every=2", f"hydra.run.dir={base}"])
    assert r.returncode == 0, r.stderr[-2000:]
    also = ["adapter.also_train=[head.*]"] if family == "vit" else []
    run = tmp_path / "lora"
    args = [*common, f"init_from={base}", "adapter=lora", "adapter.rank=2", *also, "trainer.precision=bf16"]
    r = run_abi([*args, "trainer.max_steps=2", "trainer.ckpt_every=2", "export=gguf", f"hydra.run.dir={run}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "adapter.gguf not written: llama.cpp LoRA adapters are for LLMs" in r.stderr
    assert (run / "model.gguf").is_file() and not (run / "adapter.gguf").exists()
    before = ckpt.read_state_dict(ckpt.latest_checkpoint(base) / "model.safetensors")
    model, _ = sources.load_model(run)
    trained = {n for n, p in model.named_parameters() if ".lora_" in n or (family == "vit" and n.startswith("head."))}
    towers = {n.split(".")[0] for n in trained if ".lora_" in n}
    assert towers == ({"blocks"} if family == "vit" else {"vision", "text"})
    state = model.state_dict()
    for name, tensor in before.items():
        assert torch.equal(state[name], tensor) != name.startswith("head."), name  # the head alone moved


def test_lora_compiles(tmp_path, cache_dir, base_run):
    """torch.compile over the LoRA layers: the same losses as eager."""
    eager = lora_run(tmp_path, cache_dir, base_run, ["trainer.max_steps=2"], "eager")
    compiled = lora_run(tmp_path, cache_dir, base_run, ["trainer.max_steps=2", "trainer.compile=true"], "compiled")
    want, got = losses(eager.run_dir), losses(compiled.run_dir)
    assert sorted(got) == [1, 2]
    torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(want.values())), rtol=1e-4, atol=0)
