"""GGUF export of the LLM family: what gguf.GGUFReader sees, rebuilding models from the file alone,
atomic writes and bad input. (llama.cpp itself is exercised in test_llamacpp.py.)"""

from __future__ import annotations

import logging
import pydoc_data.topics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_export_cli_refuses
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, TokenType
from gguf.quants import dequantize

from abi_train import checkpoint as ckpt
from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError
from abi_train.export import export_checkpoint, export_gguf
from abi_train.export.gguf_llm import to_gguf
from abi_train.gguf_reader import read_gguf
from abi_train.models import build_model
from abi_train.models.layers import apply_rope, rope_cache
from abi_train.models.qkv import permute_rope as permute
from abi_train.models.qkv import unpermute_rope as unpermute

Q = GGMLQuantizationType
META = {"family": "llm", "step": 42}


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    """300 tokens, so the models' 320 embedding rows need 20 padding entries in the GGUF vocab."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(list(pydoc_data.topics.topics.values())[:20], 300).save(path)
    return path


def gpt(style: str, **over):
    torch.manual_seed(0)
    cfg = dict(arch="gpt", name=f"t-{style}", style=style, vocab_size=320, context_length=64, n_layer=2, n_head=4,
               n_kv_head=2 if style == "llama" else None, d_model=64)  # fmt: skip
    return build_model({**cfg, **over}).eval()


def fields(reader: GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def tensor_f32(t) -> np.ndarray:
    return dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))


def expected_names(style: str, n_layer: int = 2, tied: bool = True) -> set[str]:
    per_block = {
        "llama": ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                  "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"],
        "gpt2": [f"{n}.{k}" for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
                 for k in ("weight", "bias")],
    }[style]  # fmt: skip
    top = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tied else set())
    if style == "gpt2":
        top |= {"position_embd.weight", "output_norm.bias"}
    return top | {f"blk.{i}.{n}" for i in range(n_layer) for n in per_block}


@pytest.mark.parametrize("style", ["llama", "gpt2"])
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_reader_round_trip(tmp_path, tok_path, style, outtype):
    m = gpt(style)
    out = export_gguf(m, META, tok_path, tmp_path / "m.gguf", outtype)
    reader = GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected_names(style)
    ours = to_gguf(m)
    weight_type = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[outtype]
    # Per-tensor relative error bound of each storage type.
    tol = {"f32": 0, "f16": 1e-3, "bf16": 5e-3, "q8_0": 1e-2, "q4_0": 0.15}[outtype]
    for name, t in tensors.items():
        ref = ours[name].detach().numpy()
        assert tuple(reversed(t.shape.tolist())) == ref.shape, name
        keep_f32 = ref.ndim == 1 or name == "position_embd.weight"
        assert t.tensor_type == (Q.F32 if keep_f32 else weight_type), name
        err = np.linalg.norm(tensor_f32(t) - ref) / max(np.linalg.norm(ref), 1e-12)
        assert err <= tol, (name, err)

    kv = fields(reader)
    arch = kv["general.architecture"]
    assert arch == style and kv["general.name"] == f"t-{style}" and kv["abi_train.step"] == 42
    assert kv["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[outtype]
    hparams = {"context_length": 64, "embedding_length": 64, "block_count": 2, "feed_forward_length": m.cfg.ffn_hidden,
               "attention.head_count": 4, "attention.head_count_kv": m.cfg.n_kv_head, "vocab_size": 320}  # fmt: skip
    if style == "llama":
        hparams |= {"rope.dimension_count": 16, "rope.freq_base": 10000.0}
    assert {k: kv[f"{arch}.{k}"] for k in hparams} == hparams
    eps_key = "attention.layer_norm_rms_epsilon" if style == "llama" else "attention.layer_norm_epsilon"
    assert kv[f"{arch}.{eps_key}"] == pytest.approx(1e-5)


def test_tokenizer_metadata(tmp_path, tok_path):
    tok = Tokenizer.load(tok_path)
    kv = fields(GGUFReader(export_gguf(gpt("llama"), META, tok_path, tmp_path / "m.gguf", "f16")))
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert len(tokens) == 320 == len(set(tokens)) == len(types)
    assert tokens[:300] == [tok.hf.id_to_token(i) for i in range(300)]
    assert types[tok.eos_id] == TokenType.CONTROL
    assert set(types[300:]) == {TokenType.UNUSED} and types.count(TokenType.NORMAL) == 299
    merges = kv["tokenizer.ggml.merges"]
    assert merges and all(len(m.split(" ")) == 2 for m in merges)
    assert kv["tokenizer.ggml.bos_token_id"] == kv["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert kv["tokenizer.ggml.padding_token_id"] == tok.eos_id
    assert kv["tokenizer.ggml.add_bos_token"] is False


@pytest.mark.parametrize(
    ("style", "over"),
    [
        ("llama", {}),
        ("gpt2", {}),
        ("llama", {"tie_embeddings": False, "rope_theta": 500.0}),
        ("gpt2", {"n_layer": 3}),
        ("gpt2", {"bias": False}),
    ],
)
def test_rebuild_from_gguf_alone(tmp_path, tok_path, style, over):
    m = gpt(style, **over)
    with torch.no_grad():  # make the norms and biases non-trivial so a mix-up would show
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    out = export_gguf(m, META, tok_path, tmp_path / "m.gguf", "f32")
    assert ("output.weight" in {t.name for t in GGUFReader(out).tensors}) == (not m.cfg.tie_embeddings)
    rebuilt, tok, metadata = read_gguf(out)
    assert {k: v for k, v in rebuilt.config.items() if k != "norm_eps"} == {
        k: v for k, v in m.config.items() if k != "norm_eps"
    }
    idx = torch.randint(0, 320, (2, 40))
    assert (rebuilt(idx) - m(idx)).abs().max().item() < 1e-5
    text = "Hello, World!  It's 2024 -- naïve café \n\n\tdone<|endoftext|>"
    assert tok.encode(text) == Tokenizer.load(tok_path).encode(text)
    assert tok.eos_id == Tokenizer.load(tok_path).eos_id and tok.vocab_size == 300
    assert metadata["abi_train.family"] == "llm" and "tokenizer.ggml.tokens" not in metadata


def test_rope_permutation_gives_llamacpp_adjacent_pairs():
    """Permuted Q/K with adjacent-pair RoPE (llama.cpp) give the same scores as ours with rotate-half."""
    n_head, hd, d, T = 2, 8, 16, 5
    wq, wk, x = torch.randn(n_head * hd, d), torch.randn(n_head * hd, d), torch.randn(T, d)
    cache = rope_cache(T, hd, 10000.0)

    def heads(w):
        return (x @ w.T).view(T, n_head, hd).transpose(0, 1)

    def rope_adjacent(t):  # rotate pairs (2i, 2i+1) by angle pos * theta^(-2i/hd)
        cos, sin = cache[0, :, : hd // 2], cache[1, :, : hd // 2]
        a, b = t[..., 0::2], t[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)

    ours = apply_rope(heads(wq), cache) @ apply_rope(heads(wk), cache).transpose(-1, -2)
    theirs = rope_adjacent(heads(permute(wq, n_head))) @ rope_adjacent(heads(permute(wk, n_head))).transpose(-1, -2)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(unpermute(permute(wq, n_head), n_head), wq)


def test_quantized_rows_that_do_not_fit_fall_back_to_f16(tmp_path, tok_path, caplog):
    m = gpt("llama", d_model=48, n_head=4, n_kv_head=2)  # rows of 48 are not whole 32-blocks; ffn_down's 128 are
    with caplog.at_level(logging.WARNING):
        reader = GGUFReader(export_gguf(m, META, tok_path, tmp_path / "m.gguf", "q8_0"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == Q.F16 and types["blk.0.ffn_down.weight"] == Q.Q8_0
    assert "blk.0.attn_q.weight" in caplog.text and "blk.0.ffn_down.weight" not in caplog.text


def test_failed_export_leaves_no_file(tmp_path, tok_path, monkeypatch):
    out = tmp_path / "m.gguf"
    export_gguf(gpt("llama"), META, tok_path, out, "f16")
    before = out.read_bytes()

    def half_then_fail(self, **kw):
        self.fout[0].write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(gpt("gpt2"), META, tok_path, out, "f32")
    assert out.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # and no temp file is left


def test_bad_inputs(tmp_path, tok_path):
    m, out = gpt("llama"), tmp_path / "m.gguf"
    cases = [
        (dict(outtype="q5_k"), "outtype 'q5_k' is not supported"),
        (dict(tok=None), "needs a tokenizer.json"),
        (dict(tok=tmp_path / "nope.json"), "needs a tokenizer.json"),
        (dict(out=tmp_path / "missing" / "m.gguf"), "output directory does not exist"),
        (dict(m=gpt("llama", vocab_size=256)), "tokenizer has 300 tokens but the model embeds only 256"),
    ]
    for args, msg in cases:
        a = {"m": m, "meta": META, "tok": tok_path, "out": out, "outtype": "f16", **args}
        with pytest.raises(UserError, match=msg):
            export_gguf(a["m"], a["meta"], a["tok"], a["out"], a["outtype"])
        assert list(tmp_path.iterdir()) == []
    for path, msg in [(tmp_path / "x.gguf", "not found"), (tok_path, "not a readable GGUF")]:
        with pytest.raises(UserError, match=msg):
            read_gguf(path)


def write_checkpoint(run_dir: Path, model, tok_path: Path | None, family: str = "llm") -> Path:
    tmp = ckpt.begin_checkpoint(run_dir, 9)
    ckpt.write_weights(tmp, model)
    meta = {"family": family, "model_config": model.config, "metadata": {}, "config": {}}
    copy = (lambda d: (d / "tokenizer.json").write_bytes(tok_path.read_bytes())) if tok_path else (lambda d: None)
    return ckpt.finish_checkpoint(run_dir, tmp, 9, meta, {}, copy, 1)


def test_export_checkpoint_and_cli(tmp_path, tok_path, monkeypatch, capsys):
    m = gpt("gpt2")
    run = tmp_path / "run"
    write_checkpoint(run, m, tok_path)
    rebuilt, _, kv = read_gguf(export_checkpoint(run, tmp_path / "a.gguf", "f32"))
    assert kv["abi_train.step"] == 9
    idx = torch.randint(0, 320, (1, 30))
    assert (rebuilt(idx) - m(idx)).abs().max().item() < 1e-5

    # The real command line, once, in a subprocess.
    r = subprocess.run([sys.executable, "-m", "abi_train.export", str(run), "-o", str(tmp_path / "b.gguf"),
                        "--outtype", "q8_0"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert GGUFReader(tmp_path / "b.gguf").fields["general.file_type"].contents() == 7

    corrupt = write_checkpoint(tmp_path / "corrupt", m, tok_path)
    (corrupt / "model.safetensors").write_bytes((corrupt / "model.safetensors").read_bytes()[:1000])
    write_checkpoint(tmp_path / "notok", m, None)
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = [
        ([str(tmp_path / "notok"), "-o", str(bad / "m.gguf")], "needs a tokenizer.json"),
        ([str(run), "-o", str(bad / "m.gguf"), "--outtype", "q3"], "outtype 'q3' is not supported"),
        ([str(run), "-o", str(tmp_path / "nodir" / "m.gguf")], "output directory does not exist"),
        ([str(tmp_path / "corrupt"), "-o", str(bad / "m.gguf")], "does not fit this model"),
        ([str(tmp_path / "nothing"), "-o", str(bad / "m.gguf")], "does not exist"),
    ]
    assert_export_cli_refuses(monkeypatch, capsys, cases, bad)
