"""Hugging Face LLM folders in and out, checked against transformers itself: tiny random Llama / Qwen2 /
GPT-2 models saved with save_pretrained are imported (logits equal transformers' in fp32), exported back
(transformers loads them and agrees again), and trained on through the CLI; bad folders fail in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_export_cli_refuses, llamacpp_logits, run_abi

from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError
from abi_train.export import export_hf
from abi_train.hf import load_hf_folder, parse_size, write_hf_folder
from abi_train.hf.llm import to_hf
from abi_train.models import build_model
from abi_train.sources import load_pretrained
from abi_train.weights import load_pretrained_weights

transformers = pytest.importorskip("transformers")

VOCAB = 320
TOL = 1e-4
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2}
BASE |= {"num_attention_heads": 4, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 1}
CASES = {
    # GQA + llama3 rope scaling + untied head + q/k/v/o biases, saved in shards
    "llama-gqa": (
        "LlamaForCausalLM",
        BASE
        | {"num_key_value_heads": 2, "rope_parameters": {**LLAMA3, "rope_theta": 5e4}}
        | {"tie_word_embeddings": False, "attention_bias": True},
    ),
    # tied head, linear rope scaling, explicit head_dim (n_head * head_dim != hidden)
    "llama-tied": (
        "LlamaForCausalLM",
        BASE
        | {"head_dim": 32, "tie_word_embeddings": True}
        | {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
    ),
    "qwen2": ("Qwen2ForCausalLM", BASE | {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "gpt2": (
        "GPT2LMHeadModel",
        {
            "vocab_size": VOCAB,
            "n_positions": 64,
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "bos_token_id": 0,
            "eos_token_id": 1,
        },
    ),
}
# GPT-2 with the exact GELU (nanoGPT's MLP): abi_train's gpt2 style with model.act=gelu. Not a GGUF case:
# llama.cpp's gpt2 computes the tanh form, so its export is refused (test below).
CASES["gpt2-exact-gelu"] = ("GPT2LMHeadModel", CASES["gpt2"][1] | {"activation_function": "gelu"})
GGUF_CASES = [case for case in CASES if case != "gpt2-exact-gelu"]
MODEL_CONFIG = {
    "LlamaForCausalLM": "LlamaConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
    "GPT2LMHeadModel": "GPT2Config",
}


def make_hf(case: str, path: Path, **save_kwargs) -> torch.nn.Module:
    """A tiny random transformers model of ``case``, saved into ``path``; returned in eval mode."""
    arch, kwargs = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, MODEL_CONFIG[arch])(**kwargs)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # random (not zero) biases and norm weights, so a mis-mapped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, **save_kwargs)
    return model


def hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def ours_from(path: Path) -> torch.nn.Module:
    pretrained = load_pretrained(path)
    model = build_model(pretrained.model_config)
    load_pretrained_weights(model, pretrained)
    return model.eval()


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_import_and_export_match_transformers(tmp_path, case):
    """Import -> our logits == transformers'; to_hf -> transformers loads it -> logits equal again."""
    src = tmp_path / "src"
    sharded = case == "llama-gqa"
    ref = make_hf(case, src, **({"max_shard_size": "100KB"} if sharded else {}))
    if sharded:
        assert (src / "model.safetensors.index.json").is_file()
    ours = ours_from(src)
    x = ids()
    with torch.no_grad():
        assert max_diff(ours(x), hf_logits(ref, x)) <= TOL

    out = write_hf_folder(to_hf(ours, {}, None), tmp_path / "out", max_shard_bytes=60_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1  # sharded past the limit
    back = getattr(transformers, CASES[case][0]).from_pretrained(out).eval()
    assert max_diff(hf_logits(back, x), hf_logits(ref, x)) <= TOL
    # and our own reader takes the exported folder back unchanged
    assert load_hf_folder(out).model_config == load_hf_folder(src).model_config | {"name": "out"}


def test_gpt2_pytorch_bin_and_bare_names(tmp_path):
    """pytorch_model.bin (torch.load weights_only) and GPT2Model's names without ``transformer.``."""
    src = tmp_path / "bin"
    ref = make_hf("gpt2", src)
    # transformers 5 always writes safetensors; older versions wrote exactly this torch.save'd state dict
    (src / "model.safetensors").unlink()
    torch.save(ref.state_dict(), src / "pytorch_model.bin")
    x = ids()
    with torch.no_grad():
        assert max_diff(ours_from(src)(x), hf_logits(ref, x)) <= TOL

    bare = tmp_path / "bare"
    ref.transformer.save_pretrained(bare)  # GPT2Model: tensors "h.0.attn.c_attn.weight", ...
    assert json.loads((bare / "config.json").read_text())["architectures"] == ["GPT2Model"]
    with torch.no_grad():
        assert max_diff(ours_from(bare)(x), hf_logits(ref, x)) <= TOL


def test_bias_free_gpt2_exports_with_zero_biases(tmp_path):
    ours = build_model({"arch": "gpt", "style": "gpt2", "vocab_size": VOCAB, "context_length": 64, "bias": False})
    out = write_hf_folder(to_hf(ours.eval(), {}, None), tmp_path / "out")
    back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    x = ids()
    with torch.no_grad():
        assert max_diff(ours(x), hf_logits(back, x)) <= TOL


def tiny_tokenizer(folder: Path) -> Tokenizer:
    text = [f"def function_{i}(x):\n    return x * {i} + 'hello world'\n" for i in range(200)]
    tok = Tokenizer.train(text, VOCAB - 20, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok = Tokenizer(tok.hf, eos="<|im_end|>", bos="<|im_start|>", chat_template=CHAT)
    tok.save(folder / "tokenizer.json")
    return tok


def test_tokenizer_defaults_from_generation_config(tmp_path):
    """tokenizer_config.json without eos/bos: the ids of generation_config.json name them."""
    src = tmp_path / "src"
    make_hf("llama-tied", src)
    tok = tiny_tokenizer(src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    for key in ("eos_token", "bos_token"):
        del config[key]
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    eos, bos = tok.hf.token_to_id("<|im_end|>"), tok.hf.token_to_id("<|endoftext|>")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 7], "bos_token_id": bos}))
    got = load_pretrained(src).tokenizer
    assert (got.eos_id, got.bos_id, got.chat_template) == (eos, bos, CHAT)
    (src / "tokenizer.json").unlink()
    assert load_pretrained(src).tokenizer is None


def test_train_from_hf_then_export_cli(tmp_path, cache_dir):
    """init_from=HF folder -> 2 CPU steps -> `python -m abi_train.export RUN -o DIR --format hf` ->
    transformers' logits equal ours for the trained weights; AutoTokenizer gives our ids."""
    src = tmp_path / "src"
    make_hf("llama-gqa", src)
    tok = tiny_tokenizer(src)
    run = tmp_path / "run"
    r = run_abi(
        ["recipe=llm", f"init_from={src}", "data.seq_len=32", "trainer.max_steps=2", "trainer.batch_size=2"]
        + ["trainer.eval_every=0", "trainer.ckpt_every=2", "trainer.progress=false", f"data.cache_dir={cache_dir}"]
        + [f"hydra.run.dir={run}"]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "exported"
    r = run_abi([str(run), "-o", str(out), "--format", "hf", "--max-shard-size", "100KB"], module="abi_train.export")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model.safetensors.index.json").is_file()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    from abi_train.sources import load_model

    ours, _ = load_model(run)
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    x = ids()
    with torch.no_grad():
        assert max_diff(ours(x), hf_logits(back, x)) <= TOL
        src_model = transformers.LlamaForCausalLM.from_pretrained(src).eval()
        assert max_diff(hf_logits(src_model, x), hf_logits(back, x)) > 0  # the 2 steps changed the weights

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "def function_7(x):\n    return 'hello world'<|im_end|>"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.bos_token == "<|im_start|>"
    chat = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(chat, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_id

    # a shape override that contradicts the source: one line, exit 2, no run dir written
    bad_run = tmp_path / "bad_run"
    r = run_abi(["recipe=llm", f"init_from={src}", "model.n_layer=3", "data.seq_len=32", f"hydra.run.dir={bad_run}"])
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "model.n_layer=3" in r.stderr
    assert not (bad_run / "checkpoints").exists()

    # exporting onto an existing non-empty folder is refused, untouched
    r = run_abi([str(run), "-o", str(out), "--format", "hf"], module="abi_train.export")
    assert r.returncode == 2 and "already exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def refuses(path: Path, *needles: str) -> None:
    with pytest.raises(UserError) as e:
        ours_from(path)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_bad_folders(tmp_path):
    good = tmp_path / "good"
    make_hf("llama-tied", good)

    def variant(name: str) -> Path:
        p = tmp_path / name
        shutil.copytree(good, p)
        return p

    p = variant("mamba")  # an architecture no family reads: named, with the supported ones
    cfg = json.loads((p / "config.json").read_text())
    (p / "config.json").write_text(json.dumps(cfg | {"architectures": ["MambaForCausalLM"]}))
    refuses(p, "'MambaForCausalLM'", "is not supported", "LlamaForCausalLM")

    p = variant("noconfig")
    (p / "config.json").unlink()
    refuses(p, "no config.json")

    p = variant("noweights")
    (p / "model.safetensors").unlink()
    refuses(p, "no weights", "model.safetensors")

    from safetensors.torch import load_file, save_file

    tensors = load_file(good / "model.safetensors")
    p = variant("wrongshape")
    save_file(tensors | {"model.layers.1.mlp.up_proj.weight": torch.zeros(97, 64)}, p / "model.safetensors")
    refuses(p, "model.layers.1.mlp.up_proj.weight", "(97, 64)")

    p = variant("wrongshape_q")
    save_file(tensors | {"model.layers.0.self_attn.k_proj.weight": torch.zeros(128, 65)}, p / "model.safetensors")
    refuses(p, "model.layers.0.self_attn.k_proj.weight", "(128, 65)")

    p = variant("unknown")
    save_file(tensors | {"model.layers.0.self_attn.q_norm.weight": torch.zeros(32)}, p / "model.safetensors")
    refuses(p, "model.layers.0.self_attn.q_norm.weight")

    p = variant("missing")
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.down" not in k}, p / "model.safetensors")
    refuses(p, "blocks.1.mlp.down.weight")

    p = variant("mlp_bias")
    (p / "config.json").write_text(json.dumps(cfg | {"mlp_bias": True}))
    refuses(p, "mlp_bias")

    p = variant("yarn")
    (p / "config.json").write_text(json.dumps(cfg | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    refuses(p, "'yarn'", "llama3")

    p = tmp_path / "shards"
    make_hf("llama-gqa", p, max_shard_size="100KB")
    shard = sorted(p.glob("model-*.safetensors"))[1]
    shard.unlink()
    refuses(p, shard.name, "missing")


def test_export_refusals(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    ours = build_model({"arch": "gpt", "vocab_size": VOCAB})
    with pytest.raises(UserError, match="already exists"):
        write_hf_folder(to_hf(ours, {}, None), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left behind
    with pytest.raises(UserError, match="does not exist"):
        export_hf(tmp_path / "nope", tmp_path / "out2")
    empty = tmp_path / "empty"
    empty.mkdir()
    write_hf_folder(to_hf(ours, {}, None), empty)  # an empty folder is fine
    assert (empty / "model.safetensors").is_file()

    bad = tmp_path / "bad"
    bad.mkdir()
    nothing, target = str(tmp_path / "nothing"), str(bad / "x")
    cases = [
        ([nothing, "-o", target, "--format", "hf", "--outtype", "f16"], "--outtype is for --format gguf"),
        ([nothing, "-o", target, "--format", "hf", "--max-shard-size", "lots"], "'lots' is not a size"),
        ([nothing, "-o", target, "--max-shard-size", "1GB"], "--max-shard-size is for --format hf"),
        ([nothing, "-o", target, "--format", "hf"], "does not exist"),
    ]
    assert_export_cli_refuses(monkeypatch, capsys, cases, bad)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("100KB") == 100_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1234") == 1234
    for bad in ("lots", "0", "-1GB"):
        with pytest.raises(UserError):
            parse_size(bad)


@pytest.mark.llamacpp
def test_exact_gelu_gpt2_does_not_export_to_gguf(tmp_path):
    from abi_train.export import export_gguf

    make_hf("gpt2-exact-gelu", tmp_path / "src")
    tiny_tokenizer(tmp_path / "src")
    ours = ours_from(tmp_path / "src")
    assert ours.cfg.act == "gelu"
    with pytest.raises(UserError, match="llama.cpp's gpt2 computes the tanh GELU; a model.act=gelu model"):
        export_gguf(ours, {"family": "llm"}, tmp_path / "src" / "tokenizer.json", tmp_path / "m.gguf", "f32")
    assert not list(tmp_path.glob("m.gguf*"))


@pytest.mark.parametrize("case", GGUF_CASES)
def test_imported_model_exports_to_gguf_llamacpp_agrees(tmp_path, case):
    """HF folder -> abi_train -> GGUF f32 -> llama.cpp: its logits equal ours (relative error < 1e-3)."""
    pytest.importorskip("llama_cpp")
    import numpy as np

    from abi_train.export import export_gguf

    src = tmp_path / "src"
    make_hf(case, src)
    tok = tiny_tokenizer(src)
    ours = ours_from(src)
    out = export_gguf(ours, {"family": "llm", "step": 0}, src / "tokenizer.json", tmp_path / "m.gguf", "f32")
    prompt = tok.encode("def function_7(x):\n    return 'hello world' * 3")
    with torch.no_grad():
        ref = ours(torch.tensor([prompt]))[0].numpy()
    got = llamacpp_logits(out, prompt, n_ctx=64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-3
