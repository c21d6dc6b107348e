"""The GPT model (both styles), its configs and the generation CLI.

Golden logits: tests/golden/gpt_<size>.safetensors hold a slice of the logits of a seeded model built
from configs/model/<size>.yaml. After an intended change to the model's math or init, regenerate with
    ABI_REGEN_GOLDEN=1 pytest tests/test_gpt.py -k golden
and say why in the commit.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from abi_train import checkpoint as ckpt
from abi_train.cli import config_dir
from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError
from abi_train.generate import generate_text
from abi_train.models import build_model

GOLDEN = Path(__file__).parent / "golden"
SIZES = ["tiny", "gpt2-tiny", "llama-small", "gpt2-124m", "llama-135m"]


def model_cfg(size: str, vocab_size: int = 128, **over) -> dict:
    cfg = yaml.safe_load((config_dir() / "model" / f"{size}.yaml").read_text())
    if cfg["vocab_size"] is None:
        cfg["vocab_size"] = vocab_size
    return {**cfg, **over}


def tiny(style: str = "llama", seed: int = 0, **over):
    torch.manual_seed(seed)
    return build_model(model_cfg("tiny" if style == "llama" else "gpt2-tiny", **over)).eval()


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_shapes_and_loss(style):
    m = tiny(style)
    idx = torch.randint(0, 128, (2, 16))
    logits = m(idx)
    assert logits.shape == (2, 16, 128)
    loss = m(idx, idx)
    assert loss.ndim == 0
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), idx.flatten()))
    masked = idx.clone()
    masked[:, ::2] = -100  # ignored targets: the mean runs over the others only
    want = F.cross_entropy(logits[:, 1::2].flatten(0, 1), idx[:, 1::2].flatten())
    torch.testing.assert_close(m(idx, masked), want)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    with pytest.raises(ValueError, match="context_length"):
        m(torch.zeros(1, 129, dtype=torch.long))


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_causal(style):
    m = tiny(style)
    idx = torch.randint(0, 128, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 128
    a, b = m(idx), m(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12], b[:, 12])


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = tiny("llama")  # 4 query heads share 2 key/value heads
    c = gqa.cfg
    hd = c.d_model // c.n_head
    assert gqa.blocks[0].attn.qkv.weight.shape == ((c.n_head + 2 * c.n_kv_head) * hd, c.d_model)
    mha = tiny("llama", n_kv_head=None)
    sd = gqa.state_dict()
    for i in range(c.n_layer):
        q, k, v = sd[f"blocks.{i}.attn.qkv.weight"].split([c.n_head * hd, c.n_kv_head * hd, c.n_kv_head * hd])
        rep = c.n_head // c.n_kv_head
        k, v = (t.view(c.n_kv_head, hd, -1).repeat_interleave(rep, dim=0).reshape(-1, c.d_model) for t in (k, v))
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
    mha.load_state_dict(sd)
    idx = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(gqa(idx), mha(idx))


def test_loss_ignore_index():
    m = tiny()
    idx = torch.randint(0, 128, (2, 8))
    targets = torch.randint(0, 128, (2, 8))
    targets[0, :5] = -100
    targets[1, 3] = -100
    logits = m(idx)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(m(idx, targets), expected)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_tied_weights_saved_once_and_reload(tmp_path, style):
    m = tiny(style)
    assert m.lm_head.weight is m.tok_embd.weight
    path = tmp_path / "model.safetensors"
    ckpt.write_weights(tmp_path, m)
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
    assert len({"lm_head.weight", "tok_embd.weight"} & names) == 1
    assert "rope" not in names  # recomputed, not stored
    fresh = tiny(style, seed=1)
    ckpt.load_weights(fresh, tmp_path)
    assert fresh.lm_head.weight is fresh.tok_embd.weight
    idx = torch.randint(0, 128, (1, 12))
    torch.testing.assert_close(fresh(idx), m(idx), rtol=0, atol=0)


def test_untied_and_config_round_trip():
    m = tiny(tie_embeddings=False)
    assert m.lm_head.weight is not m.tok_embd.weight
    again = build_model(m.config)
    assert again.config == m.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


@pytest.mark.parametrize("size", ["tiny", "gpt2-tiny"])
def test_golden_logits(size):
    torch.manual_seed(1234)
    m = build_model(model_cfg(size)).eval()
    idx = (torch.arange(24).reshape(2, 12) * 7) % 128
    got = m(idx)[:, :, :16].detach().contiguous()
    path = GOLDEN / f"gpt_{size}.safetensors"
    if os.environ.get("ABI_REGEN_GOLDEN") == "1":
        save_file({"logits": got}, str(path))
    torch.testing.assert_close(got, load_file(str(path))["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", SIZES)
def test_every_size_builds(size):
    with torch.device("meta"):  # no memory or init time for the big ones
        m = build_model(model_cfg(size))
    c = m.cfg
    assert c.d_model % c.n_head == 0 and c.ffn_hidden % 64 == 0
    expected = {"gpt2-124m": 124.48e6, "llama-135m": 134.52e6}  # GPT-2 small (vocab 50304), SmolLM-135M
    if size in expected:
        assert abs(m.num_params() - expected[size]) / expected[size] < 1e-3


def test_flops_per_item_matches_the_palm_formula():
    with torch.device("meta"):
        m = build_model(model_cfg("gpt2-124m"))
    c = m.cfg
    # 6N + 12*L*d*T with N = every parameter but the position table (the tied embedding is the lm_head
    # matmul); norm_f's 1536 parameters are the only ones the implementation leaves out.
    n = m.num_params() - c.context_length * c.d_model
    assert abs(m.flops_per_item() - (6 * n + 12 * c.n_layer * c.d_model * c.context_length)) <= 6 * 2 * c.d_model
    assert m.num_params(exclude_embeddings=True) == m.num_params() - (c.vocab_size + c.context_length) * c.d_model


def test_bad_configs():
    with pytest.raises(UserError, match="unknown model key.*n_layers"):
        build_model({**model_cfg("tiny"), "n_layers": 3})
    with pytest.raises(UserError, match="vocab_size is null"):
        build_model({**model_cfg("tiny"), "vocab_size": None})
    with pytest.raises(UserError, match="style"):
        build_model(model_cfg("tiny", style="mamba"))
    with pytest.raises(UserError, match="n_kv_head"):
        build_model(model_cfg("tiny", n_kv_head=3))
    with pytest.raises(UserError, match="model.bias=true is not supported for style=llama"):
        build_model(model_cfg("tiny", bias=True))


def test_gpt2_without_biases():
    """model.bias=false: no bias in any linear or LayerNorm (nanoGPT's bias=False)."""
    with torch.device("meta"):
        plain, bias_free = build_model(model_cfg("gpt2-124m")), build_model(model_cfg("gpt2-124m", bias=False))
    assert not [name for name, _ in bias_free.named_parameters() if name.endswith("bias")]
    c = plain.cfg
    per_block = 3 * c.d_model + c.d_model + c.ffn_hidden + c.d_model + 2 * c.d_model  # qkv, proj, fc, proj, 2 norms
    assert plain.num_params() - bias_free.num_params() == c.n_layer * per_block + c.d_model  # + norm_f's bias


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_generate(style):
    m = tiny(style)
    idx = torch.randint(0, 128, (2, 5))
    greedy = m.generate(idx, 140, temperature=0)  # runs past the context: crops to the last 128
    assert greedy.shape == (2, 145) and torch.equal(greedy[:, :5], idx)
    torch.testing.assert_close(m.generate(idx, 6, top_k=1), greedy[:, :11], rtol=0, atol=0)
    a = m.generate(idx, 8, generator=torch.Generator().manual_seed(3))
    b = m.generate(idx, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_kv_cache_gives_the_logits_of_a_full_forward(style):
    """A prompt into the KV cache, then one token at a time (or a chunk of several): every step's logits equal
    those of the whole sequence recomputed; past the context, generation equals the uncached sliding window."""
    from abi_train.models.layers import KVCache

    m = tiny(style)
    seq = torch.randint(0, 128, (2, 40))
    full = m(seq)
    caches = [KVCache() for _ in m.blocks]
    steps = [m(seq[:, :30], caches=caches)] + [m(seq[:, t : t + 1], caches=caches) for t in range(30, 36)]
    steps.append(m(seq[:, 36:40], caches=caches))  # a chunk into a filled cache
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)

    def uncached(idx: torch.Tensor, n: int) -> torch.Tensor:  # the definition: recompute the window every step
        for _ in range(n):
            idx = torch.cat([idx, m(idx[:, -m.cfg.context_length :])[:, -1:].argmax(-1)], dim=1)
        return idx

    prompt = torch.randint(0, 128, (1, 120))
    assert torch.equal(m.generate(prompt, 16, temperature=0), uncached(prompt, 16))


@pytest.mark.parametrize("layer_types", [None, ["sliding", "full"]])
def test_kv_cache_keeps_the_sliding_window(layer_types):
    """Past the window (Mistral v0.1's, or Gemma's sliding layers), cached decoding, one token or a chunk at a
    time, sees only the last ``window`` positions: the logits of a full forward, which differ from unwindowed."""
    from abi_train.models.layers import KVCache

    m = tiny(sliding_window=8, layer_types=layer_types)
    seq = torch.randint(0, 128, (2, 40))
    full = m(seq)
    caches = [KVCache() for _ in m.blocks]
    steps = [m(seq[:, :20], caches=caches)] + [m(seq[:, t : t + 1], caches=caches) for t in range(20, 36)]
    steps.append(m(seq[:, 36:40], caches=caches))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    plain = tiny()(seq)  # the same weights, full attention: equal until the window fills, apart after
    torch.testing.assert_close(full[:, :8], plain[:, :8], rtol=1e-5, atol=1e-5)
    assert (full[:, 8:] - plain[:, 8:]).abs().max() > 1e-3


def write_checkpoint(run_dir: Path, model, tokenizer: Tokenizer, family: str = "llm") -> Path:
    tmp = ckpt.begin_checkpoint(run_dir, 7)
    ckpt.write_weights(tmp, model)
    meta = {"family": family, "model_config": model.config, "metadata": {}, "config": {}}
    return ckpt.finish_checkpoint(run_dir, tmp, 7, meta, {}, lambda d: tokenizer.save(d / "tokenizer.json"), 1)


def test_generate_cli(tmp_path, capsys, monkeypatch):
    import pydoc_data.topics

    from abi_train import generate

    tok = Tokenizer.train(list(pydoc_data.topics.topics.values())[:20], 300)
    write_checkpoint(tmp_path, tiny(vocab_size=320), tok)
    text = generate_text(str(tmp_path), "The list", max_new_tokens=10, temperature=0)
    assert text.startswith("The list") and len(text) > len("The list")
    assert generate_text(str(tmp_path), "The list", 10, seed=5) == generate_text(str(tmp_path), "The list", 10, seed=5)

    monkeypatch.setattr("sys.argv", ["x", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "4", "--device", "cpu"])
    generate.main()
    assert capsys.readouterr().out.startswith("Hi")

    vit = build_model({"arch": "vit", "image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "heads": 2})
    write_checkpoint(tmp_path / "vit", vit, tok, family="vit")
    for argv, msg in [
        ([str(tmp_path / "vit")], "not an LLM checkpoint"),
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(tmp_path), "--device", "tpu9"], "device"),
    ]:
        monkeypatch.setattr("sys.argv", ["x", *argv])
        with pytest.raises(SystemExit) as e:
            generate.main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_gelu_form_is_a_gpt2_option():
    """gpt2's MLP GELU: the tanh form by default (GPT-2, llama.cpp), exact on request (nanoGPT); SiLU is for
    gated MLPs only."""
    x = torch.randn(2, 8, 64)
    for act, approximate in (("gelu_tanh", "tanh"), ("gelu", "none")):
        mlp = build_model({"arch": "gpt", "style": "gpt2", "vocab_size": 64, "act": act}).blocks[0].mlp
        want = mlp.proj(torch.nn.functional.gelu(mlp.fc(x), approximate=approximate))
        torch.testing.assert_close(mlp(x), want, rtol=0, atol=0)
    with pytest.raises(UserError, match="model.act='silu' is not valid for a plain .* it takes gelu_tanh | gelu"):
        build_model({"arch": "gpt", "style": "gpt2", "vocab_size": 64, "act": "silu"})
