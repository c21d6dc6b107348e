"""GGUF import from anywhere and faithful GGUF export of imported models.

References, never our own reader: transformers builds tiny random Llama (GQA, llama3 RoPE scaling, untied
head, attention_bias with its own head_dim, linear scaling), Qwen2 and GPT-2 models; their weights go into
our models, out to GGUF and back through ``load_gguf``, and the logits must equal transformers' (fp32,
max abs diff <= 1e-4). transformers' own GGUF loader reads our files; llama.cpp (when installed) reads
them, quantizes them to K-quants that we read back, and tokenizes like our imported tokenizers do for
every pre-tokenizer in the table. Chat templates render as transformers' ``apply_chat_template``.
"""

from __future__ import annotations

import json
import pydoc_data.topics
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import TRICKY_TEXTS, llamacpp_logits
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import dequantize, quantize
from tokenizers import models, pre_tokenizers
from tokenizers.implementations import SentencePieceBPETokenizer

from abi_train import generate
from abi_train.data.chat import render_chat
from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError
from abi_train.export import export_gguf, gguf_common
from abi_train.export.gguf_common import PRE_TOKENIZERS
from abi_train.export.gguf_llm import llama3_rope_factors, llama3_scaling_from_factors, to_gguf
from abi_train.gguf_reader import load_gguf, read_gguf
from abi_train.models import build_model
from abi_train.sources import load_pretrained
from abi_train.weights import load_pretrained_weights

Q = GGMLQuantizationType
META = {"family": "llm", "step": 1}
VOCAB = 320


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(list(pydoc_data.topics.topics.values())[:20], 300).save(path)
    return path


# --- transformers models and their weights in our names (the test's own map, not the adapters') ---


def hf_case(name: str):
    """(HF model in eval mode, our model config) for one architecture case."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, rope_theta=10000.0,
                  max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True)  # fmt: skip
    ours = dict(arch="gpt", vocab_size=VOCAB, context_length=128, n_layer=2, d_model=64, ffn_hidden=128,
                norm_eps=1e-5, rope_theta=10000.0)  # fmt: skip
    if name == "llama-gqa-llama3-untied":
        scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
        untied = common | {"tie_word_embeddings": False, "rope_scaling": {"rope_type": "llama3"} | scaling}
        cfg = transformers.LlamaConfig(**untied, num_attention_heads=4, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(cfg)
        ours |= dict(style="llama", n_head=4, n_kv_head=2, tie_embeddings=False,
                     rope_scaling={"type": "llama3", **scaling})  # fmt: skip
    elif name == "llama-bias-headdim-linear":
        linear = {"rope_type": "linear", "factor": 2.0}
        cfg = transformers.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=4, head_dim=24,
                                       attention_bias=True, rope_scaling=linear)  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
        ours |= dict(style="llama", n_head=4, n_kv_head=4, head_dim=24, attention_bias=True,
                     rope_scaling={"type": "linear", "factor": 2.0})  # fmt: skip
    elif name == "llama-gqa":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2)
        )
        ours |= dict(style="llama", n_head=4, n_kv_head=2)
    elif name == "llama-bias":
        cfg = transformers.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
        model = transformers.LlamaForCausalLM(cfg)
        ours |= dict(style="llama", n_head=4, n_kv_head=2, attention_bias=True)
    elif name == "qwen2":
        cfg = transformers.Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2)
        model = transformers.Qwen2ForCausalLM(cfg)
        ours |= dict(style="qwen2", n_head=4, n_kv_head=2)
    else:
        # 1024 positions: transformers' GGUF loader keeps GPT-2's default n_positions
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=64, n_layer=2, n_head=4,
                                      layer_norm_epsilon=1e-5, activation_function="gelu_new")  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
        ours = dict(arch="gpt", style="gpt2", vocab_size=VOCAB, context_length=1024, n_layer=2, n_head=4, d_model=64,
                    norm_eps=1e-5)  # fmt: skip
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval(), ours


def hf_weights_in_our_names(model, style: str) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    if style == "gpt2":
        top = {"wte.weight": "tok_embd.weight", "wpe.weight": "pos_embd.weight", "ln_f.weight": "norm_f.weight",
               "ln_f.bias": "norm_f.bias"}  # fmt: skip
        block = {"ln_1": "norm1", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "ln_2": "norm2",
                 "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}  # fmt: skip
        for name, t in sd.items():
            name = name.removeprefix("transformer.")
            if name in top:
                out[top[name]] = t
            elif name.startswith("h."):
                _, i, *rest = name.split(".")
                module, kind = ".".join(rest[:-1]), rest[-1]
                conv1d = kind == "weight" and module.startswith(("attn.c_", "mlp.c_"))
                out[f"blocks.{i}.{block[module]}.{kind}"] = t.T if conv1d else t
        out["lm_head.weight"] = out["tok_embd.weight"]
        return out
    block = {"input_layernorm": "norm1", "self_attn.o_proj": "attn.proj", "post_attention_layernorm": "norm2",
             "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down"}  # fmt: skip
    for name, t in sd.items():
        if name == "model.embed_tokens.weight":
            out["tok_embd.weight"] = t
        elif name == "model.norm.weight":
            out["norm_f.weight"] = t
        elif name == "lm_head.weight":
            out["lm_head.weight"] = t
        elif name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                continue
            out[f"blocks.{i}.{block[module]}.{kind}"] = t
    for i in range(model.config.num_hidden_layers):
        for kind in ("weight", "bias"):
            parts = [sd.get(f"model.layers.{i}.self_attn.{p}_proj.{kind}") for p in "qkv"]
            if parts[0] is not None:
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
    return out


def ours_from_hf(name: str):
    hf, cfg = hf_case(name)
    ours = build_model(cfg).eval()
    state = hf_weights_in_our_names(hf, cfg["style"])
    if cfg.get("tie_embeddings", True):
        state["lm_head.weight"] = state["tok_embd.weight"]
    ours.load_state_dict(state, strict=True)
    return hf, ours, cfg


def logits(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out


IDX = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
CASES = ["llama-gqa", "llama-gqa-llama3-untied", "llama-bias-headdim-linear", "llama-bias", "qwen2", "gpt2"]


@pytest.mark.parametrize("case", CASES)
def test_gguf_import_matches_transformers(tmp_path, tok_path, case):
    """transformers model -> our weights -> GGUF f32 -> load_gguf: same logits as transformers, and the shape
    options (GQA, head_dim, biases, RoPE scaling, untied head) come back from the file alone."""
    hf, ours, cfg = ours_from_hf(case)
    ref = logits(hf, IDX)
    assert (logits(ours, IDX) - ref).abs().max().item() <= 1e-4  # the test's own map is right
    out = export_gguf(ours, META, tok_path, tmp_path / "m.gguf", "f32")
    pretrained = load_gguf(out)
    assert pretrained.kind == "gguf" and pretrained.tokenizer is not None
    got = {k: v for k, v in pretrained.model_config.items() if k not in ("name", "norm_eps")}
    want = {k: v for k, v in ours.config.items() if k not in ("name", "norm_eps", "dropout", "bias")}
    assert {k: v for k, v in got.items() if k != "bias"} == {k: want[k] for k in got if k != "bias"}
    rebuilt = build_model(pretrained.model_config).eval()
    load_pretrained_weights(rebuilt, pretrained)
    assert (logits(rebuilt, IDX) - ref).abs().max().item() <= 1e-4
    names = {t.name for t in GGUFReader(out).tensors}
    arch = GGUFReader(out).fields["general.architecture"].contents()
    assert arch == {"qwen2": "qwen2", "gpt2": "gpt2"}.get(case, "llama")
    assert ("rope_freqs.weight" in names) == ("llama3" in case)
    assert ("output.weight" in names) == ("untied" in case)
    if "bias" in case:
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "blk.0.attn_output.bias"} <= names


@pytest.mark.parametrize("case", ["llama-gqa", "qwen2", "gpt2"])  # its loader drops llama's attention biases
def test_transformers_reads_our_gguf(tmp_path, tok_path, case):
    """transformers' own GGUF loader (an independent reader of llama.cpp's conventions) gives the original
    model's logits from our files."""
    hf, ours, _ = ours_from_hf(case)
    export_gguf(ours, META, tok_path, tmp_path / "m.gguf", "f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert (logits(theirs.eval(), IDX) - logits(hf, IDX)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.BF16, Q.F16])
def test_quantized_tensors_dequantize_as_gguf_py(tmp_path, tok_path, monkeypatch, qtype):
    """Every 2-D weight stored as ``qtype`` comes back exactly as gguf-py dequantizes it."""
    _, ours, _ = ours_from_hf("llama-gqa-llama3-untied")
    monkeypatch.setitem(gguf_common.OUTTYPES, "test", (LlamaFileType.GUESSED, qtype))
    out = export_gguf(ours, META, tok_path, tmp_path / "m.gguf", "test")
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert types["blk.0.ffn_down.weight"] == qtype
    expected = {
        name: torch.from_numpy(dequantize(quantize(t.numpy(), types[name]), types[name]).copy())
        for name, t in to_gguf(ours).items()
    }
    from abi_train.export.gguf_llm import from_gguf

    want = from_gguf(expected, load_gguf(out).model_config)
    got = load_gguf(out).load_weights()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_llama3_scaling_recovery():
    """llama.cpp's rope_freqs divisors map back to the llama3 parameters (round ones, and fitted ones)."""
    for scaling in [
        dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
        dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
        dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=3.0, original_max_position_embeddings=100),
    ]:
        s = {"type": "llama3", **scaling}
        for hd, theta in [(64, 500000.0), (16, 10000.0), (128, 500000.0)]:
            factors = llama3_rope_factors(hd, theta, s)
            back = llama3_scaling_from_factors(factors, hd, theta)
            if back is None:
                assert torch.equal(factors, torch.ones_like(factors))
                continue
            torch.testing.assert_close(llama3_rope_factors(hd, theta, back), factors, rtol=1e-6, atol=1e-6)
    assert llama3_scaling_from_factors(torch.ones(8), 16, 10000.0) is None
    with pytest.raises(UserError, match="does not reproduce"):
        llama3_scaling_from_factors(torch.tensor([1.0, 3.0, 1.5, 7.0, 2.0, 8.0, 8.0, 8.0]), 16, 10000.0)


# --- tokenizers ---


def tokenizer_with_pre(tok_path: Path, pre: str) -> Tokenizer:
    """The trained vocabulary with the split (and merge rule) of one table entry, as a tokenizer.json would be."""
    base = Tokenizer.load(tok_path)
    spec = json.loads(base.hf.to_str())
    entry = PRE_TOKENIZERS[pre]
    vocab = spec["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    hf = type(base.hf)(models.BPE(vocab, merges, ignore_merges=entry.ignore_merges))
    hf.pre_tokenizer = entry.build()
    hf.decoder = base.hf.decoder
    hf.add_special_tokens(["<|endoftext|>"])
    return Tokenizer(hf, add_bos=False)


def gguf_with_tokenizer(tmp_path: Path, tok: Tokenizer, name: str = "m.gguf") -> Path:
    tok.save(tmp_path / "tokenizer.json")
    m = build_model(dict(arch="gpt", style="llama", vocab_size=VOCAB, context_length=64, n_layer=1, n_head=2,
                         d_model=32))  # fmt: skip
    return export_gguf(m, META, tmp_path / "tokenizer.json", tmp_path / name, "f32")


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_export_matches_pre_tokenizer_and_import_restores_it(tmp_path, tok_path, pre):
    tok = tokenizer_with_pre(tok_path, pre)
    out = gguf_with_tokenizer(tmp_path, tok)
    assert GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == pre
    back = load_gguf(out).tokenizer
    assert back.gguf_pre == pre
    for s in TRICKY_TEXTS:
        assert back.encode(s) == tok.encode(s), (pre, s)


def test_export_writes_special_tokens_template_and_imported_pre(tmp_path, tok_path):
    base = Tokenizer.load(tok_path)
    base.hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    tok = Tokenizer(base.hf, bos="<|im_start|>", eos="<|im_end|>", add_bos=True, chat_template=template,
                    gguf_pre="starcoder")  # fmt: skip
    kv = {k: f.contents() for k, f in GGUFReader(gguf_with_tokenizer(tmp_path, tok)).fields.items()}
    assert kv["tokenizer.ggml.pre"] == "starcoder"  # the imported name, kept
    assert kv["tokenizer.ggml.bos_token_id"] == tok.bos_id == 300 and kv["tokenizer.ggml.eos_token_id"] == 301
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.chat_template"] == template
    types = kv["tokenizer.ggml.token_type"]
    assert types[300] == types[301] == TokenType.CONTROL
    back = load_gguf(tmp_path / "m.gguf").tokenizer
    assert (back.bos_id, back.eos_id, back.add_bos, back.chat_template) == (300, 301, True, template)
    assert back.encode("<|im_start|>user\nhi 42<|im_end|>") == tok.encode("<|im_start|>user\nhi 42<|im_end|>")


def test_export_refuses_a_pre_tokenizer_llamacpp_lacks(tmp_path, tok_path):
    tok = Tokenizer.load(tok_path)
    tok.hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel()])
    with pytest.raises(UserError, match="matches none that llama.cpp implements"):
        gguf_with_tokenizer(tmp_path, tok)
    assert not (tmp_path / "m.gguf").exists()


# --- chat templates and generation ---

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = """{{ bos_token }}{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('bad role ' + message['role']) }}
    {% endif %}
    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}
{{ messages | tojson }}"""


@pytest.mark.parametrize("template", [CHATML, LLAMA3], ids=["chatml", "llama3"])
def test_render_chat_matches_transformers(tok_path, template):
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_path), bos_token="<s>", eos_token="</s>")
    for messages in [
        [{"role": "user", "content": "Hi there, ünïcode?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " What is 2+2? "}],
    ]:
        for gen in (True, False):
            want = fast.apply_chat_template(messages, chat_template=template, tokenize=False,
                                            add_generation_prompt=gen)  # fmt: skip
            assert render_chat(template, messages, gen, "<s>", "</s>") == want
    with pytest.raises(UserError, match="bad role tool"):
        render_chat(LLAMA3, [{"role": "tool", "content": "x"}])
    with pytest.raises(UserError, match="not valid Jinja2"):
        render_chat("{% for %}", [])


def test_generate_on_a_gguf_file_with_chat(tmp_path, tok_path, monkeypatch, capsys):
    base = Tokenizer.load(tok_path)
    base.hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(base.hf, eos="<|im_end|>", chat_template=CHATML, gguf_pre="gpt-2")
    path = gguf_with_tokenizer(tmp_path, tok)
    chunks: list[str] = []
    answer = generate.generate_text(str(path), "Hello", 12, 0.0, None, chat=True, on_text=chunks.append)
    assert "".join(chunks) == answer
    ids = generate.chat_prompt(load_gguf(path).tokenizer, "Hello")
    assert base.decode(ids) == "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n" \
        "<|im_start|>assistant\n"  # fmt: skip
    monkeypatch.setattr("sys.argv", ["x", str(path), "--prompt", "Hi", "--max-new-tokens", "3", "--device", "cpu"])
    generate.main()
    assert capsys.readouterr().out.startswith("Hi")

    # --chat without --prompt: a conversation; the second turn's prompt holds the first exchange
    turns = iter(["Hello", "", "Again"])
    prompts: list[list[int]] = []
    real_chat_ids = generate.chat_ids
    monkeypatch.setattr(generate, "chat_ids", lambda t, m: prompts.append(real_chat_ids(t, m)) or prompts[-1])
    messages = generate.chat_session(str(path), lambda: next(turns, None), chunks.append, 12, 0.0, None)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == answer  # greedy: the same first answer as above
    first_exchange = base.decode(prompts[0]) + answer + "<|im_end|>\n"
    assert base.decode(prompts[1]).startswith(first_exchange) and base.decode(prompts[1]).endswith(
        "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = gguf_with_tokenizer(tmp_path, Tokenizer.load(tok_path), "plain.gguf")
    for argv, msg in [
        ([str(plain), "--chat", "--prompt", "x"], "--chat needs a chat template"),
        ([str(tok_path), "--prompt", "x"], "is a file but not a GGUF file"),
    ]:
        monkeypatch.setattr("sys.argv", ["x", *argv])
        with pytest.raises(SystemExit) as e:
            generate.main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, err


# --- bad input ---


def test_bad_gguf_files(tmp_path, tok_path):
    good = gguf_with_tokenizer(tmp_path, Tokenizer.load(tok_path))
    reader = GGUFReader(good)
    # As another producer's file: no abi_train.* keys, so general.architecture picks the family.
    skip = ("GGUF.", "general.architecture", "abi_train.")
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith(skip)}
    tensors = {t.name: dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))).copy()
               for t in reader.tensors}  # fmt: skip

    def variant(name: str, arch: str = "llama", **changes) -> Path:
        values = {k: v for k, v in (kv | changes).items() if v is not None and not isinstance(v, float)}
        floats = {k: v for k, v in (kv | changes).items() if isinstance(v, float)}
        w = GGUFWriter(tmp_path / name, arch)
        for key, value in values.items():
            if isinstance(value, bool):
                w.add_bool(key, value)
            elif isinstance(value, str):
                w.add_string(key, value)
            elif isinstance(value, list):
                w.add_array(key, value)
            else:
                w.add_uint32(key, value)
        for key, value in floats.items():
            w.add_float32(key, value)
        for n, t in tensors.items():
            w.add_tensor(n, t)
        if "int_tensor" in changes:
            w.add_tensor("blk.0.extra.weight", np.zeros((4, 8), dtype=np.int32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    renamed = {k.replace("llama.", "mamba."): v for k, v in kv.items()}
    notgguf = tmp_path / "notes.txt"
    notgguf.write_text("hello")
    cases = [
        (
            variant("arch.gguf", "mamba", **renamed),
            "GGUF architecture 'mamba' is not one abi_train can rebuild; supported: clip, ",
        ),  # fmt: skip
        (variant("pre.gguf", **{"tokenizer.ggml.pre": "tekken"}), "tokenizer.ggml.pre 'tekken' is not supported"),
        (
            variant("spm.gguf", **{"tokenizer.ggml.model": "llama"}),
            "SentencePiece vocabulary has no tokenizer.ggml.scores",
        ),
        (variant("wpm.gguf", **{"tokenizer.ggml.model": "bert"}), "tokenizer.ggml.model 'bert' is not supported"),
        (variant("int.gguf", int_tensor=True), "tensor blk.0.extra.weight has type I32, which gguf-py cannot"),
        (variant("scale.gguf", **{"llama.rope.scaling.type": "yarn"}), "rope.scaling.type 'yarn' is not supported"),
    ]
    assert load_pretrained(variant("foreign.gguf")).model_config["style"] == "llama"  # the variants' base loads
    for path, msg in cases:
        with pytest.raises(UserError) as e:
            load_pretrained(path)
        assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(UserError, match="is a file but not a GGUF file"):
        load_pretrained(notgguf)
    with pytest.raises(UserError, match="not a readable GGUF file"):
        load_gguf(notgguf)
    (tmp_path / "trunc.gguf").write_bytes(good.read_bytes()[:300])
    with pytest.raises(UserError, match="not a readable GGUF file"):
        read_gguf(tmp_path / "trunc.gguf")


# --- llama.cpp ---


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.mark.llamacpp
@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_imported_tokenizer_matches_llamacpp(tmp_path, tok_path, llama_cpp, pre):
    """For every pre-tokenizer in the table: llama.cpp's tokenization of the file == ours of the imported file."""
    out = gguf_with_tokenizer(tmp_path, tokenizer_with_pre(tok_path, pre))
    ours = load_gguf(out).tokenizer
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    try:
        for s in TRICKY_TEXTS + ["DIGITS 0123456789 ９٣ and 'S 'LL 'Re"]:
            assert llm.tokenize(s.encode(), add_bos=False, special=True) == ours.encode(s), (pre, s)
    finally:
        llm.close()


@pytest.mark.llamacpp
@pytest.mark.parametrize(
    "case", ["llama-gqa-llama3-untied", "llama-bias", "llama-bias-headdim-linear", "qwen2", "gpt2"]
)
def test_llamacpp_runs_our_export_of_imported_models(tmp_path, tok_path, llama_cpp, case):
    """llama3 rope_freqs, attention biases (also with a head_dim of its own and linear scaling), qwen2 (no
    permutation) and gpt2: llama.cpp's logits are transformers' (test_llamacpp.py's f32 tolerance)."""
    hf, ours, _ = ours_from_hf(case)
    out = export_gguf(ours, META, tok_path, tmp_path / "m.gguf", "f32")
    ids = IDX[0].tolist()
    ref = logits(hf, IDX[:1])[0].numpy()
    got = llamacpp_logits(out, ids)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 1e-3, rel


@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q6_K", "Q5_K_S", "Q2_K"])
def test_kquant_files_from_llamacpp(tmp_path, tok_path, llama_cpp, ftype):
    """llama.cpp's own quantizer writes K-quants; we read them (gguf-py dequantizes) into the model llama.cpp
    runs: same logits as transformers' GGUF loader of that file, and llama.cpp's argmax."""
    torch.manual_seed(0)
    m = build_model(dict(arch="gpt", style="llama", vocab_size=VOCAB, context_length=64, n_layer=1, n_head=4,
                         n_kv_head=2, d_model=256, ffn_hidden=512))  # fmt: skip
    src = export_gguf(m, META, tok_path, tmp_path / "f32.gguf", "f32")
    dst = tmp_path / f"{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    kinds = {t.tensor_type.name for t in GGUFReader(dst).tensors}
    assert any(k.endswith("_K") for k in kinds), kinds
    pretrained = load_gguf(dst)
    ours = build_model(pretrained.model_config).eval()
    load_pretrained_weights(ours, pretrained)
    idx = IDX[:1, :32]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=dst.name, dtype=torch.float32)
    assert (logits(ours, idx) - logits(theirs.eval(), idx)).abs().max().item() <= 1e-4


def test_load_gguf_of_our_vit_and_clip_files(tmp_path):
    """init_from=FILE.gguf for abi_train's own vision files: config, lazily read weights, tokenizer, metadata."""
    from test_export_vision import CLIP_META, VIT_META, clip, vit

    from abi_train.data.tokenizer import EOS

    tok_path = tmp_path / "clip_tok.json"
    Tokenizer.train(list(pydoc_data.topics.topics.values())[:20], 300, special_tokens=(EOS, "<|startoftext|>")).save(
        tok_path
    )
    for m, meta, tok in [(vit(), VIT_META, None), (clip(tok_path), CLIP_META, tok_path)]:
        out = export_gguf(m, meta, tok, tmp_path / f"{m.config['arch']}.gguf", "f32")
        pretrained = load_pretrained(out)
        assert pretrained.kind == "gguf" and build_model(pretrained.model_config).config == m.config
        assert set(pretrained.metadata) == set(meta["metadata"])
        for key in ("image_mean", "image_std"):  # stored as float32
            assert pretrained.metadata[key] == pytest.approx(meta["metadata"][key], abs=1e-7)
        assert pretrained.metadata.get("class_names") == meta["metadata"].get("class_names")
        assert (pretrained.tokenizer is None) == (tok is None)
        rebuilt = build_model(pretrained.model_config).eval()
        load_pretrained_weights(rebuilt, pretrained)
        for name, t in m.state_dict().items():
            torch.testing.assert_close(rebuilt.state_dict()[name], t, rtol=0, atol=0, msg=name)


def test_hf_tokenizer_json_pre_tokenizers_match_the_table():
    """The pre_tokenizer blocks as Hugging Face model folders ship them (GPT-2, SmolLM2, Llama 3, Qwen2) map to
    llama.cpp's pre names; GPT-2 with a prefix space maps to none."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    split = {"type": "Split", "behavior": "Isolated", "invert": False}
    bytes_only = {**byte_level, "use_regex": False}
    llama3 = gguf_common.LLAMA3_SPLIT
    cases = {
        "gpt-2": ({**byte_level}, False),
        "smollm": (
            {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]},
            False,
        ),  # fmt: skip
        "llama-bpe": (
            {"type": "Sequence", "pretokenizers": [{**split, "pattern": {"Regex": llama3}}, bytes_only]},
            True,
        ),  # fmt: skip
        "qwen2": (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {**split, "pattern": {"Regex": gguf_common.QWEN2_SPLIT}},
                    {**bytes_only, "trim_offsets": False},
                ],
            },
            False,
        ),  # fmt: skip
    }
    for want, (pre, ignore_merges) in cases.items():
        spec = {"pre_tokenizer": pre, "model": {"type": "BPE", "ignore_merges": ignore_merges}}
        assert gguf_common.match_pre_tokenizer(spec, "tokenizer.json") == want
    with pytest.raises(UserError, match="matches none"):
        spec = {"pre_tokenizer": {**byte_level, "add_prefix_space": True}, "model": {"type": "BPE"}}
        gguf_common.match_pre_tokenizer(spec, "tokenizer.json")


def sentencepiece_gguf(path: Path) -> Path:
    """A llama.cpp SentencePiece vocabulary as its converter writes one (<unk>, <s>, </s>, 256 byte tokens, pieces
    scored by merge order), trained here on ~60 KB of Python docs, in a tiny llama model."""
    sp = SentencePieceBPETokenizer(add_prefix_space=True)
    docs = list(pydoc_data.topics.topics.values())[:20]
    sp.train_from_iterator(docs, vocab_size=600, show_progress=False, special_tokens=[])
    vocab = sp.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    m = build_model(dict(arch="gpt", style="llama", vocab_size=len(tokens), context_length=64, n_layer=1, n_head=2,
                         d_model=32))  # fmt: skip
    w = GGUFWriter(path, "llama")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_feed_forward_length(m.cfg.ffn_hidden)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for name, t in to_gguf(m).items():
        w.add_tensor(name, t.detach().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


LONG = list(pydoc_data.topics.topics.values())[20:50]


def test_sentencepiece_vocab_round_trips(tmp_path):
    pretrained = load_gguf(sentencepiece_gguf(tmp_path / "spm.gguf"))
    tok = pretrained.tokenizer
    assert tok.add_bos and (tok.bos_id, tok.eos_id) == (1, 2)  # llama.cpp's SentencePiece default: BOS first
    for s in TRICKY_TEXTS[:-1]:
        assert tok.decode(tok.encode(s)) == s, s
    assert tok.decode(tok.encode("one</s>two")) == "one</s> two"  # SentencePiece's space after a special token
    assert tok.encode("中")[1:] == [3 + b for b in "中".encode()]  # after "▁": no piece covers it, so its bytes
    tok.save(tmp_path / "tokenizer.json")  # and back to GGUF: the same vocabulary, tokenizing the same
    m = build_model(pretrained.model_config)
    out = export_gguf(m, META, tmp_path / "tokenizer.json", tmp_path / "out.gguf", "f32")
    before, after = ({k: f.contents() for k, f in GGUFReader(p).fields.items()} for p in (tmp_path / "spm.gguf", out))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        assert after[key] == before[key], key
    again = load_gguf(out).tokenizer
    for s in [*TRICKY_TEXTS, "one</s>two <s> three", *LONG]:
        assert again.encode(s) == tok.encode(s), s[:80]


@pytest.mark.llamacpp
def test_sentencepiece_vocab_matches_llamacpp(tmp_path, llama_cpp):
    path = sentencepiece_gguf(tmp_path / "spm.gguf")
    ours = load_gguf(path).tokenizer
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for s in [*TRICKY_TEXTS, "one</s>two <s> three", " x", "", *LONG]:
            assert llm.tokenize(s.encode(), add_bos=False, special=True) == ours.encode(s), s[:80]
        assert llm.tokenize(b"Hello", add_bos=True, special=False) == ours.encode_prompt("Hello")
    finally:
        llm.close()
