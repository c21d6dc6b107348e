"""LoRA adapter exports checked against their real consumers: a few CLI steps of LoRA on tiny random
transformers models (Llama with GQA and biases, Qwen2 with rsLoRA, GPT-2's fused c_attn), then

- llama.cpp: the base's f32 GGUF + ``lora_path=adapter.gguf`` gives the logits of the merged model.gguf and ours;
- PEFT: ``PeftModel.from_pretrained(base, --format peft folder)`` gives our logits, and so does transformers on
  the merged ``--format hf`` export;
- a ViT transfer's adapter (LoRA + a fresh head in PEFT's modules_to_save) over HF ViTForImageClassification;
- bad inputs (no adapter, ViT/CLIP for llama.cpp, also_train PEFT cannot hold, options of another format) fail
  in one line and write nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_export_cli_refuses, llamacpp_logits, run_abi
from safetensors.torch import load_file
from test_hf_llm import VOCAB, make_hf, tiny_tokenizer

from abi_train.errors import UserError
from abi_train.export import export_gguf
from abi_train.export.gguf_lora import export_gguf_lora
from abi_train.hf.peft import peft_adapter
from abi_train.lora import LoRAConfig, apply_lora, lora_layers
from abi_train.models import build_model
from abi_train.sources import load_model, load_pretrained
from abi_train.weights import load_pretrained_weights

transformers = pytest.importorskip("transformers")

RUN = ["recipe=llm", "data.seq_len=32", "trainer.max_steps=3", "trainer.batch_size=2", "trainer.eval_every=0"]
RUN += ["trainer.ckpt_every=3", "trainer.progress=false", "optim.lr=2e-2", "optim.warmup_steps=1"]
LORA = ["adapter=lora", "export=gguf", "export.outtype=f32"]  # export=gguf: also model.gguf and adapter.gguf
CASES = {  # name -> (HF case of test_hf_llm, adapter overrides)
    "llama": ("llama-gqa", ["adapter.rank=4", "adapter.targets=[all]"]),
    "qwen2-rslora": (
        "qwen2",
        ["adapter.rank=4", "adapter.alpha=6", "adapter.rslora=true", "adapter.targets=[q,k,v,down]"],
    ),
    "gpt2": ("gpt2", ["adapter.rank=2", "adapter.targets=[q,v,o,down]"]),
    # PEFT's modules_to_save; no llama.cpp adapter (export.adapter=false), which cannot carry full tensors
    "llama-also-train": (
        "llama-gqa",
        ["adapter.rank=2", "adapter.targets=[q,v,down]", "adapter.also_train=[norm_f.*,lm_head.*,blocks.1.norm2.*]"]
        + ["export.adapter=false"],
    ),
}
LLAMACPP_CASES = ["llama", "qwen2-rslora", "gpt2"]
TEXT = "def function_7(x):\n    return 'hello world' * 3"


class Trained:
    """One LoRA run over a tiny HF model: its base folder, run dir and our LoRA model."""

    def __init__(self, root: Path, case: str, cache_dir: Path) -> None:
        hf_case, overrides = CASES[case]
        self.src, self.run = root / "src", root / "run"
        make_hf(hf_case, self.src)
        self.tok = tiny_tokenizer(self.src)
        r = run_abi(
            RUN
            + LORA
            + overrides
            + [f"init_from={self.src}", f"data.cache_dir={cache_dir}", f"hydra.run.dir={self.run}"]
        )
        assert r.returncode == 0, r.stderr[-3000:]
        self.model, self.meta = load_model(self.run)
        self.ids = self.tok.encode(TEXT)

    def ours(self) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.tensor([self.ids]))[0].numpy()

    def base_gguf(self, path: Path) -> Path:
        """Our f32 GGUF export of the untouched base (the HF folder)."""
        pretrained = load_pretrained(self.src)
        base = build_model(pretrained.model_config)
        load_pretrained_weights(base, pretrained)
        return export_gguf(base.eval(), {"family": "llm"}, self.src / "tokenizer.json", path, "f32")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    runs: dict[str, Trained] = {}

    def get(case: str) -> Trained:
        if case not in runs:
            runs[case] = Trained(tmp_path_factory.mktemp(case), case, cache_dir)
        return runs[case]

    return get


def export_cli(monkeypatch, capsys, argv: list[str]) -> None:
    """`python -m abi_train.export argv`, in this process (the same main(); no interpreter start-up)."""
    from abi_train.export import __main__ as export_main

    capsys.readouterr()  # what came before
    monkeypatch.setattr(sys, "argv", ["x", *argv])
    export_main.main()
    assert capsys.readouterr().out.startswith("wrote ")


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_run_trains_every_b(trained):
    """The runs the other tests use are real: every LoRA B moved off zero, the base did not."""
    t = trained("llama")
    layers = dict(lora_layers(t.model))
    assert len(layers) == 2 * 5  # per block: qkv, proj, gate, up, down
    for name, layer in layers.items():
        for target, b in layer.lora_b.items():
            assert b.abs().min() > 0, f"{name}.{target}"


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", LLAMACPP_CASES)
def test_llamacpp_adapter_equals_merged_and_ours(trained, tmp_path, monkeypatch, capsys, case):
    """base.gguf + adapter.gguf in llama.cpp == the merged model.gguf in llama.cpp == our LoRA model."""
    pytest.importorskip("llama_cpp")
    import llama_cpp
    from gguf import GGUFReader

    t = trained(case)
    out = tmp_path / "cli.gguf"
    export_cli(monkeypatch, capsys, [str(t.run), "-o", str(out), "--format", "gguf-lora"])
    assert out.read_bytes() == (t.run / "adapter.gguf").read_bytes()  # the trainer's export=gguf wrote the same
    reader = GGUFReader(out)
    kv = {f.name: f.contents() for f in reader.fields.values()}
    cfg = LoRAConfig.from_dict(t.meta["adapter"])
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["general.architecture"] == t.model.cfg.style
    assert kv["adapter.lora.alpha"] == pytest.approx(cfg.scale * cfg.rank)
    assert all(tensor.name.endswith((".lora_a", ".lora_b")) for tensor in reader.tensors)

    base = t.base_gguf(tmp_path / "base.gguf")
    llm = llama_cpp.Llama(model_path=str(base), lora_path=str(out), logits_all=True, n_ctx=64, verbose=False, seed=0)
    try:
        llm.eval(t.ids)
        with_adapter = np.array(llm.scores[: len(t.ids)])
    finally:
        llm.close()
    merged = llamacpp_logits(t.run / "model.gguf", t.ids, n_ctx=64)
    plain = llamacpp_logits(base, t.ids, n_ctx=64)
    ours = t.ours()
    print(f"{case}: adapter vs merged {rel(with_adapter, merged):.2e}, vs ours {rel(with_adapter, ours):.2e}")
    assert rel(plain, ours) > 0.01  # the adapter changes the model visibly
    assert rel(with_adapter, merged) < 1e-4  # both in llama.cpp: W x + s B A x vs (W + s B A) x
    assert rel(with_adapter, ours) < 1e-3 and rel(merged, ours) < 1e-3  # llama.cpp vs PyTorch, f32 (as test_hf_llm)
    if case == "llama":  # the CLI's --format gguf of a LoRA run is the merged model too
        cli_merged = tmp_path / "merged.gguf"
        export_cli(monkeypatch, capsys, [str(t.run), "-o", str(cli_merged), "--outtype", "f32"])
        assert rel(llamacpp_logits(cli_merged, t.ids, n_ctx=64), merged) < 1e-6
    if case == "llama":  # --outtype f16: half the bytes, f16 rounding only
        half = export_gguf_lora(t.model, t.meta, tmp_path / "f16.gguf", "f16")
        assert half.stat().st_size < 0.6 * out.stat().st_size
        llm = llama_cpp.Llama(model_path=str(base), lora_path=str(half), logits_all=True, n_ctx=64, verbose=False)
        try:
            llm.eval(t.ids)
            assert rel(np.array(llm.scores[: len(t.ids)]), merged) < 1e-3
        finally:
            llm.close()


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_and_merged_hf_match_ours(trained, tmp_path, monkeypatch, capsys, case):
    """PeftModel over the base folder with our --format peft folder == our LoRA model; the merged --format hf
    export loaded by transformers == our LoRA model too."""
    peft = pytest.importorskip("peft")
    t = trained(case)
    x = torch.tensor([t.ids])
    ours = torch.from_numpy(t.ours())
    out = tmp_path / "adapter"
    export_cli(monkeypatch, capsys, [str(t.run), "-o", str(out), "--format", "peft"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(t.src)
    assert config["use_rslora"] == (case == "qwen2-rslora") and config["fan_in_fan_out"] == (case == "gpt2")
    tensors = load_file(out / "adapter_model.safetensors")
    lora = {k for k in tensors if k.endswith((".lora_A.weight", ".lora_B.weight"))}
    assert all(k.startswith("base_model.model.") for k in tensors)
    if case == "llama-also-train":
        assert set(config["modules_to_save"]) == {"model.layers.1.post_attention_layernorm", "model.norm", "lm_head"}
        assert set(tensors) - lora == {f"base_model.model.{m}.weight" for m in config["modules_to_save"]}
        base_norm = load_file(t.src / "model.safetensors")["model.norm.weight"]
        assert (tensors["base_model.model.model.norm.weight"] - base_norm).abs().max() > 1e-2  # trained in full
    else:
        assert lora == set(tensors) and config["modules_to_save"] is None

    base = transformers.AutoModelForCausalLM.from_pretrained(t.src).eval()
    model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        got = model(input_ids=x).logits[0]
        with model.disable_adapter():
            plain = model(input_ids=x).logits[0]
    assert (plain - ours).abs().max() > 0.01
    assert (got - ours).abs().max() <= 1e-4

    merged_dir = tmp_path / "merged"
    export_cli(monkeypatch, capsys, [str(t.run), "-o", str(merged_dir), "--format", "hf"])
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        assert (merged(input_ids=x).logits[0] - ours).abs().max() <= 1e-4


def test_cli_refuses_bad_inputs(trained, tmp_path, monkeypatch, capsys, cache_dir):
    """No adapter, an option of another format, a bad outtype or output: exit 2, one line, nothing written."""
    t = trained("llama")
    plain = tmp_path / "plain"
    r = run_abi(
        RUN + ["adapter=none", "trainer.max_steps=1", "trainer.ckpt_every=1", f"init_from={t.src}"]
        + [f"data.cache_dir={cache_dir}", f"hydra.run.dir={plain}"]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    no_adapter = (
        f"{plain} has no adapter (it was trained without adapter=lora); export the model with --format gguf or hf"
    )
    r = run_abi([str(plain), "-o", str(out_dir / "a.gguf"), "--format", "gguf-lora"], module="abi_train.export")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {no_adapter}", r.stderr
    assert list(out_dir.iterdir()) == []
    run, also = str(t.run), str(trained("llama-also-train").run)
    assert_export_cli_refuses(
        monkeypatch,
        capsys,
        [
            ([str(plain), "-o", str(out_dir / "peft"), "--format", "peft"], no_adapter),
            ([run, "-o", str(out_dir / "peft"), "--format", "peft", "--outtype", "f16"], "--outtype is for --format"),
            ([run, "-o", str(out_dir / "a.gguf"), "--format", "gguf-lora", "--outtype", "q8_0"], "valid: f32, f16"),
            (
                [run, "-o", str(out_dir / "a.gguf"), "--format", "gguf-lora", "--max-shard-size", "1GB"],
                "for --format hf",
            ),
            ([run, "-o", str(out_dir / "no" / "a.gguf"), "--format", "gguf-lora"], "output directory does not exist"),
            ([also, "-o", str(out_dir / "a.gguf"), "--format", "gguf-lora"], "trained base tensors in full"),
        ],
        out_dir,
    )


def test_clip_and_also_train_are_refused(tmp_path):
    """llama.cpp adapters of a ViT / CLIP, PEFT adapters of a CLIP and also_train that PEFT cannot hold: one
    UserError each, no file."""
    vit = build_model(dict(arch="vit", image_size=32, patch_size=8, width=32, depth=1, heads=2, num_classes=3))
    apply_lora(vit, LoRAConfig(rank=2))
    meta = {"family": "vit", "adapter": LoRAConfig(rank=2).to_dict()}
    with pytest.raises(UserError, match="llama.cpp LoRA adapters are for LLMs; this is a vit model"):
        export_gguf_lora(vit, meta, tmp_path / "a.gguf")
    for cfg, message in (
        (LoRAConfig(rank=2, also_train=("class_embd",)), "the class token or position embedding"),
        (
            LoRAConfig(rank=2, targets=("o",), also_train=("blocks.0.attn.qkv.*",)),
            "trains the fused blocks.0.attn.qkv, which HF's ViT splits",
        ),
    ):
        vit = build_model(vit.config)
        apply_lora(vit, cfg)
        with pytest.raises(UserError, match=message):
            peft_adapter(vit, {"family": "vit", "adapter": cfg.to_dict()})
    clip = dict(arch="clip", vocab_size=50, eot_id=3, embed_dim=8, image_size=16, patch_size=8, vision_width=16)
    clip = build_model(clip | dict(vision_layers=1, vision_heads=2, context_length=8, text_width=16, text_layers=1))
    apply_lora(clip, LoRAConfig(rank=2))
    with pytest.raises(UserError, match="llama.cpp LoRA adapters are for LLMs; this is a clip model"):
        export_gguf_lora(clip, {"family": "clip"}, tmp_path / "a.gguf")
    with pytest.raises(UserError, match="PEFT adapter export is for LLMs .* and ViT; this is a clip model"):
        peft_adapter(clip, {"family": "clip"})

    gpt = build_model({"arch": "gpt", "style": "llama", "vocab_size": VOCAB, "context_length": 32, "n_layer": 1})
    assert gpt.cfg.tie_embeddings
    peft_refuses = {  # also_train -> PEFT's refusal (None: it carries them as modules_to_save)
        ("norm_f.*",): None,
        ("blocks.0.attn.qkv.weight",): "also has a LoRA update; PEFT cannot save both",
        ("tok_embd.*",): "trains the tied embedding / head",
    }
    for also, message in peft_refuses.items():
        model = build_model(gpt.config)
        cfg = LoRAConfig(rank=2, also_train=also)
        apply_lora(model, cfg)
        meta = {"family": "llm", "adapter": cfg.to_dict()}
        with pytest.raises(UserError, match=r"adapter.also_train=\[.*\] trained base tensors in full"):
            export_gguf_lora(model, meta, tmp_path / "a.gguf")
        if message is None:
            assert peft_adapter(model, meta)[0]["modules_to_save"] == ["model.norm"]
        else:
            with pytest.raises(UserError, match=message):
                peft_adapter(model, meta)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.llamacpp
@pytest.mark.smollm2
def test_adapter_over_quantized_smollm2_in_llamacpp(tmp_path):
    """The SFT default's hand-off: an adapter over the real Q4_1 SmolLM2 file. llama.cpp quantizes activations
    for Q4_1 (its own base is 5% off ours), so the check is that the adapter moves llama.cpp to our LoRA model:
    much closer than without it, and at the same argmax on most positions."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from test_smollm2 import GGUF

    from abi_train.gguf_reader import load_gguf

    pretrained = load_gguf(GGUF)
    model = build_model(pretrained.model_config).eval()
    load_pretrained_weights(model, pretrained)
    ids = pretrained.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    cfg = LoRAConfig(rank=4, alpha=8)
    torch.manual_seed(0)  # A's init
    apply_lora(model, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for b in layer.lora_b.values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)  # a trained-looking adapter, without training
        ours = model(torch.tensor([ids]))[0].numpy()
    adapter = export_gguf_lora(model, {"family": "llm", "adapter": cfg.to_dict()}, tmp_path / "adapter.gguf")
    plain = llamacpp_logits(GGUF, ids, n_ctx=64)
    llm = llama_cpp.Llama(
        model_path=str(GGUF), lora_path=str(adapter), logits_all=True, n_ctx=64, verbose=False, seed=0
    )
    try:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    agree = float((got.argmax(-1) == ours.argmax(-1)).mean())
    print(
        f"smollm2 Q4_1: without adapter {rel(plain, ours):.3f} from ours, with it {rel(got, ours):.3f}; argmax {agree}"
    )
    assert rel(got, ours) < 0.3 * rel(plain, ours)
    assert agree >= 0.8  # activation quantization flips near-ties (as test_smollm2 finds without an adapter)


def test_vit_peft_adapter_with_a_fresh_head(tmp_path):
    """A ViT transfer's adapter (LoRA on every target; the classifier and a LayerNorm trained in full) as a PEFT
    folder over the HF ViTForImageClassification folder: PEFT's logits (transformers 5 module names) equal ours."""
    peft = pytest.importorskip("peft")
    from test_hf_vision import hf_vit_folder

    from abi_train.hf.peft import write_peft_folder

    src = hf_vit_folder(tmp_path / "vit")
    pretrained = load_pretrained(src)
    model = build_model(pretrained.model_config).eval()
    load_pretrained_weights(model, pretrained)
    cfg = LoRAConfig(rank=2, alpha=4, targets=("all",), also_train=("head.*", "blocks.1.norm2.*"))
    torch.manual_seed(0)
    apply_lora(model, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter and head
        for _, layer in lora_layers(model):
            for b in layer.lora_b.values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
        model.head.weight.add_(torch.randn(model.head.weight.shape, generator=gen))
        model.blocks[1].norm2.bias.add_(torch.randn(model.blocks[1].norm2.bias.shape, generator=gen))
    meta = {"family": "vit", "adapter": {**cfg.to_dict(), "base": {"init_from": str(src)}}}
    out = write_peft_folder(model, meta, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["vit.layers.1.layernorm_after", "classifier"] and config["task_type"] is None
    assert config["target_modules"] == ["fc1", "fc2", "k_proj", "o_proj", "q_proj", "v_proj"]

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    base = transformers.ViTForImageClassification.from_pretrained(src).eval()
    with torch.no_grad():
        plain = base(pixel_values=images).logits
        ours = model(images)
        got = peft.PeftModel.from_pretrained(base, out).eval()(pixel_values=images).logits
    assert (plain - ours).abs().max() > 0.1
    assert (got - ours).abs().max() <= 1e-4
