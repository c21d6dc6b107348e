"""Hugging Face adapter for ``models.gpt``: LlamaForCausalLM, Qwen2ForCausalLM and GPT2LMHeadModel folders.

- Llama / Qwen2: HF's separate q/k/v projections become our fused ``attn.qkv`` (rows [q|k|v]). Both sides
  use rotate-half RoPE, so no row permutation (that is only for llama.cpp, see export/gguf_llm.py).
  ``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5) of type llama3 / linear map to
  our ``rope_scaling`` dict; Qwen2 is llama with q/k/v biases.
- GPT-2: Conv1D stores weights as (in, out), the transpose of nn.Linear; tensor names come with or without
  the ``transformer.`` prefix (GPT2LMHeadModel vs GPT2Model); the causal-mask buffers are skipped.
- A tied head is absent from HF files; our state dict then takes the embedding for ``lm_head.weight``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError
from abi_train.hf import HFExport, HFFolder
from abi_train.weights import check_weights, expected_shapes

READS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel", "GPT2Model")
STYLE = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2"}
# HF activation_function -> our gpt2 style's act
GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}

# Non-weight tensors some HF versions store: rotary caches, GPT-2's causal mask.
IGNORED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")

LLAMA_BLOCK = {  # HF name inside model.layers.N -> ours inside blocks.N (q/k/v are fused separately)
    "input_layernorm": "norm1",
    "self_attn.o_proj": "attn.proj",
    "post_attention_layernorm": "norm2",
    "mlp.gate_proj": "mlp.gate",
    "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.down",
}
GPT2_BLOCK = {
    "ln_1": "norm1",
    "attn.c_attn": "attn.qkv",
    "attn.c_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.c_fc": "mlp.fc",
    "mlp.c_proj": "mlp.proj",
}
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # (in, out) weights
LLAMA_TOP = {"model.embed_tokens": "tok_embd", "model.norm": "norm_f", "lm_head": "lm_head"}
GPT2_TOP = {"wte": "tok_embd", "wpe": "pos_embd", "ln_f": "norm_f"}


def _where(folder: HFFolder) -> str:
    return str(folder.path / folder.config_name)


def _rope_scaling(folder: HFFolder, c: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, our rope_scaling) from transformers 4's rope_theta + rope_scaling or 5's rope_parameters."""
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise UserError(f"{_where(folder)}: rope_parameters / rope_scaling must be an object, got {params!r}")
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(params["factor"])}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in params]
        if missing:
            raise UserError(f"{_where(folder)}: llama3 rope scaling lacks {', '.join(missing)}")
        return theta, {"type": "llama3", **{k: float(params[k]) for k in keys[:3]}, keys[3]: int(params[keys[3]])}
    raise UserError(f"{_where(folder)}: rope type {kind!r} is not supported; supported: default, linear, llama3")


def _style(folder: HFFolder) -> str:
    return STYLE[folder.architecture]


def config_from_hf(folder: HFFolder) -> dict[str, Any]:
    """Builder kwargs for ``models.gpt`` from config.json; options we cannot compute are a UserError."""
    c, where, style = folder.config, _where(folder), _style(folder)

    def need(key: str) -> Any:
        if c.get(key) is None:
            raise UserError(f"{where} lacks {key!r}, which a {folder.architecture} config needs")
        return c[key]

    name = folder.path.resolve().name
    if style == "gpt2":
        act = c.get("activation_function", "gelu_new")
        if act not in GPT2_ACTS:
            raise UserError(f"{where}: activation_function={act!r} is not supported; supported: {', '.join(GPT2_ACTS)}")
        act = GPT2_ACTS[act]
        if c.get("scale_attn_by_inverse_layer_idx") or c.get("scale_attn_weights", True) is False:
            raise UserError(f"{where}: scale_attn_by_inverse_layer_idx / scale_attn_weights=false are not supported")
        d = int(need("n_embd"))
        return {
            "arch": "gpt",
            "style": "gpt2",
            "vocab_size": int(need("vocab_size")),
            "context_length": int(need("n_positions")),
            "n_layer": int(need("n_layer")),
            "n_head": int(need("n_head")),
            "d_model": d,
            "ffn_hidden": int(c.get("n_inner") or 4 * d),
            "norm_eps": float(c.get("layer_norm_epsilon", 1e-5)),
            "tie_embeddings": bool(c.get("tie_word_embeddings", True)),
            "bias": True,
            "act": act,
            "name": name,
        }
    if c.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act={c['hidden_act']!r} is not supported; supported: silu")
    if c.get("mlp_bias"):
        raise UserError(f"{where}: mlp_bias=true is not supported (abi_train's SwiGLU MLP has no biases)")
    if style == "qwen2" and c.get("use_sliding_window"):
        raise UserError(f"{where}: use_sliding_window=true is not supported (abi_train attends to the full context)")
    theta, scaling = _rope_scaling(folder, c)
    d, n_head = int(need("hidden_size")), int(need("num_attention_heads"))
    config = {
        "arch": "gpt",
        "style": style,
        "vocab_size": int(need("vocab_size")),
        "context_length": int(need("max_position_embeddings")),
        "n_layer": int(need("num_hidden_layers")),
        "n_head": n_head,
        "n_kv_head": int(c.get("num_key_value_heads") or n_head),
        "d_model": d,
        "head_dim": int(c.get("head_dim") or d // n_head),
        "ffn_hidden": int(need("intermediate_size")),
        "norm_eps": float(c.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
        "name": name,
    }
    if style == "llama":
        config["attention_bias"] = bool(c.get("attention_bias", False))
    return config


def state_dict_from_hf(folder: HFFolder, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The folder's tensors under our names; an unknown name, a missing or wrong-shaped tensor is named."""
    tensors = {k: v for k, v in folder.tensors.items() if not IGNORED.search(k)}
    gpt2 = config["style"] == "gpt2"
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # our name -> the HF name(s) it came from, for error messages
    qkv: dict[int, dict[str, dict[str, torch.Tensor]]] = {}  # layer -> weight|bias -> q|k|v
    block = re.compile(
        r"^(?:transformer\.)?h\.(\d+)\.(.+)\.(weight|bias)$" if gpt2 else r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$"
    )
    for hf_name, t in tensors.items():
        m = block.match(hf_name)
        if m:
            layer, inner, kind = int(m.group(1)), m.group(2), m.group(3)
            if not gpt2 and inner in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(layer, {}).setdefault(kind, {})[inner[-6]] = t
                continue
            ours = (GPT2_BLOCK if gpt2 else LLAMA_BLOCK).get(inner)
            if ours is not None:
                if gpt2 and inner in CONV1D and kind == "weight":
                    t = t.t()
                name = f"blocks.{layer}.{ours}.{kind}"
                state[name], origin[name] = t.contiguous(), hf_name
                continue
        else:
            stem, _, kind = hf_name.rpartition(".")
            if gpt2:
                stem = stem.removeprefix("transformer.")
            ours = (GPT2_TOP | {"lm_head": "lm_head"} if gpt2 else LLAMA_TOP).get(stem)
            if ours is not None:
                name = f"{ours}.{kind}"
                state[name], origin[name] = t, hf_name
                continue
        raise UserError(f"{folder.path}: tensor {hf_name} is not one a {folder.architecture} model has")
    head_dim, n_kv_head = config.get("head_dim") or 0, config.get("n_kv_head") or 0  # llama / qwen2 only
    rows = {"q": config["n_head"] * head_dim, "k": n_kv_head * head_dim, "v": n_kv_head * head_dim}
    for layer, kinds in qkv.items():
        for kind, parts in kinds.items():
            if set(parts) != {"q", "k", "v"}:
                lacking = sorted({"q", "k", "v"} - set(parts))[0]
                raise UserError(f"{folder.path}: lacks model.layers.{layer}.self_attn.{lacking}_proj.{kind}")
            for part, t in parts.items():
                shape = (rows[part], config["d_model"]) if kind == "weight" else (rows[part],)
                if tuple(t.shape) != shape:
                    raise UserError(
                        f"{folder.path}: tensor model.layers.{layer}.self_attn.{part}_proj.{kind} has shape "
                        f"{tuple(t.shape)}; {_where(folder)} implies {shape}"
                    )
            name = f"blocks.{layer}.attn.qkv.{kind}"
            state[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
            origin[name] = f"model.layers.{layer}.self_attn.q_proj/k_proj/v_proj.{kind}"
    if config["tie_embeddings"] and "tok_embd.weight" in state:
        state["lm_head.weight"] = state["tok_embd.weight"]  # a stored copy of a tied head is the same tensor
        origin["lm_head.weight"] = origin["tok_embd.weight"]
    check_weights(state, expected_shapes(config), str(folder.path), origin)
    return state


def _token_for(tok_ids: Any, hf: Any) -> str | None:
    if isinstance(tok_ids, list):
        tok_ids = tok_ids[0] if tok_ids else None
    if not isinstance(tok_ids, int):
        return None
    return hf.id_to_token(tok_ids)


def tokenizer_from_hf(folder: HFFolder) -> Tokenizer | None:
    """tokenizer.json with its tokenizer_config.json; BOS/EOS default to the ids of generation_config.json
    or config.json when the tokenizer config does not name them. None when the folder has no tokenizer."""
    if not (folder.path / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_file(str(folder.path / "tokenizer.json"))
    except Exception:  # noqa: BLE001 (Tokenizer.load below reports it as a UserError)
        return Tokenizer.load(folder.path)
    ids = {**folder.config, **(folder.json("generation_config.json") or {})}
    defaults = {}
    for key in ("eos", "bos", "pad"):
        token = _token_for(ids.get(f"{key}_token_id"), hf)
        if token is not None:
            defaults[f"{key}_token"] = token
    return Tokenizer.load(folder.path, defaults=defaults)


def metadata_from_hf(folder: HFFolder, config: dict[str, Any]) -> dict[str, Any]:
    return {"source_architecture": folder.architecture}


# --- export ----------------------------------------------------------------------------------------------


def _hf_config(c: Any, tokenizer: Tokenizer | None) -> dict[str, Any]:
    ids: dict[str, Any] = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    common = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32"}
    common |= {"dtype": "float32", "use_cache": True, "initializer_range": 0.02, **ids}
    if c.style == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_positions": c.context_length,
            "n_ctx": c.context_length,
            "n_embd": c.d_model,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_inner": c.ffn_hidden,
            "activation_function": "gelu_new" if c.act == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": c.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            **common,
        }
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    rope_scaling = None
    if c.rope_scaling:
        rope_scaling = {k: v for k, v in c.rope_scaling.items() if k != "type"} | {"rope_type": c.rope_scaling["type"]}
        rope_parameters = {**rope_scaling, "rope_theta": c.rope_theta}
    config = {
        "architectures": ["Qwen2ForCausalLM" if c.style == "qwen2" else "LlamaForCausalLM"],
        "model_type": c.style,
        "hidden_size": c.d_model,
        "intermediate_size": c.ffn_hidden,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.context_length,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,  # transformers 4
        "rope_scaling": rope_scaling,  # transformers 4
        "rope_parameters": rope_parameters,  # transformers 5
        "attention_dropout": 0.0,
        **common,
    }
    if c.style == "llama":
        config |= {"attention_bias": c.attention_bias, "mlp_bias": False, "pretraining_tp": 1}
    else:
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": c.n_layer}
    return config


def to_hf(model: Any, meta: dict[str, Any], tokenizer: Tokenizer | None) -> HFExport:
    """``model`` (a models.gpt.GPT) as a Llama / Qwen2 / GPT-2 folder, by its style."""
    c = model.cfg
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    q_rows, kv_rows = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    if c.style == "qwen2" and c.attention_bias:
        raise UserError("a qwen2-style model with attention_bias=true (an output bias) has no Qwen2ForCausalLM form")
    for name, t in state.items():
        if c.tie_embeddings and name == "lm_head.weight":
            continue  # transformers ties it to the embedding
        m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", name)
        if c.style == "gpt2":
            if m:
                layer, inner, kind = m.groups()
                hf_inner = {v: k for k, v in GPT2_BLOCK.items()}[inner]
                if hf_inner in CONV1D and kind == "weight":
                    t = t.t()
                out[f"transformer.h.{layer}.{hf_inner}.{kind}"] = t.contiguous()
            else:
                stem, kind = name.rsplit(".", 1)
                hf = {v: k for k, v in GPT2_TOP.items()}.get(stem)
                out[f"transformer.{hf}.{kind}" if hf else f"{stem}.{kind}"] = t
            continue
        if m:
            layer, inner, kind = m.groups()
            prefix = f"model.layers.{layer}"
            if inner == "attn.qkv":
                q, k, v = t.split([q_rows, kv_rows, kv_rows])
                for part, x in zip("qkv", (q, k, v), strict=True):
                    out[f"{prefix}.self_attn.{part}_proj.{kind}"] = x.contiguous()
            else:
                out[f"{prefix}.{ {v: k for k, v in LLAMA_BLOCK.items()}[inner] }.{kind}"] = t
        else:
            stem, kind = name.rsplit(".", 1)
            out[f"{ {v: k for k, v in LLAMA_TOP.items()}[stem] }.{kind}"] = t
    if c.style == "gpt2" and not c.bias:
        _add_zero_biases(out, c)
    files: dict[str, dict[str, Any]] = {}
    if tokenizer is not None:
        gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "_from_model_config": True}
        if tokenizer.pad_id is not None:
            gen["pad_token_id"] = tokenizer.pad_id
        files["generation_config.json"] = gen
    return HFExport(_hf_config(c, tokenizer), out, files, tokenizer)


def _add_zero_biases(out: dict[str, torch.Tensor], c: Any) -> None:
    """HF GPT-2 always has biases (and LayerNorm biases); a bias-free model is the same with zeros."""
    sizes = {"ln_1": c.d_model, "attn.c_attn": 3 * c.d_model, "attn.c_proj": c.d_model, "ln_2": c.d_model}
    sizes |= {"mlp.c_fc": c.ffn_hidden, "mlp.c_proj": c.d_model}
    for layer in range(c.n_layer):
        for inner, n in sizes.items():
            out.setdefault(f"transformer.h.{layer}.{inner}.bias", torch.zeros(n))
    out.setdefault("transformer.ln_f.bias", torch.zeros(c.d_model))
