"""Every LLM family (abi_train/models/families) checked against the independent references, from tiny random
transformers models saved with save_pretrained (norms and biases perturbed away from 1 and 0), one case per
file in tests/family_cases:

- init_from the HF folder: our logits equal transformers' (fp32, <= 1e-4), on a text longer than any sliding
  window; ``--format hf`` loads back in transformers with the same logits;
- the GGUF export runs in llama.cpp: logits to relative error <= 2e-3 and the same greedy continuation;
  a case llama.cpp cannot compute (``gguf_refuses``) is refused instead, model and adapter, in one line;
- files llama.cpp itself quantized from ours (Q8_0, Q4_K_M) import back with logits close to llama.cpp's on
  that same file;
- LoRA: the PEFT folder loads in peft over the transformers base with our logits; the llama.cpp adapter over
  the base GGUF equals the merged GGUF in llama.cpp.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import llamacpp_logits, run_abi
from family_cases import FamilyCase
from test_hf_llm import tiny_tokenizer

from abi_train.errors import UserError
from abi_train.export import export_gguf
from abi_train.export.gguf_lora import export_gguf_lora
from abi_train.hf import load_hf_folder, write_hf_folder
from abi_train.hf.llm import to_hf
from abi_train.hf.peft import write_peft_folder
from abi_train.lora import LoRAConfig, apply_lora, lora_layers
from abi_train.models import build_model
from abi_train.sources import load_pretrained
from abi_train.weights import load_pretrained_weights

transformers = pytest.importorskip("transformers")

CASES: dict[str, FamilyCase] = {}
for _file in sorted((Path(__file__).parent / "family_cases").glob("[!_]*.py")):
    CASES |= importlib.import_module(f"family_cases.{_file.stem}").CASES
GGUF_CASES = [name for name, case in CASES.items() if case.gguf and not case.gguf_refuses]
REFUSED_GGUF_CASES = [name for name, case in CASES.items() if case.gguf_refuses]
TEXT = "def function_7(x):\n    return 'hello world' * 3 + function_8(x) - 'hello world'"
META = {"family": "llm", "step": 0}
TOL = 1e-4


def make_hf(case: FamilyCase, path: Path, **overrides) -> torch.nn.Module:
    """The tiny random transformers model of ``case`` saved into ``path`` with a tokenizer; in eval mode."""
    torch.manual_seed(0)
    config = getattr(transformers, case.config_class)(**(case.config | overrides))
    model = getattr(transformers, case.model_class)(config).eval()
    with torch.no_grad():  # random (not zero / one) biases and norm weights, so a mis-mapped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    tiny_tokenizer(path)
    return model


def ours_from(path: Path) -> torch.nn.Module:
    pretrained = load_pretrained(path)
    model = build_model(pretrained.model_config)
    load_pretrained_weights(model, pretrained)
    return model.eval()


def ids(path: Path) -> list[int]:
    return load_pretrained(path).tokenizer.encode(TEXT)


def hf_logits(model: torch.nn.Module, x: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([x])).logits[0]


def our_logits(model: torch.nn.Module, x: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([x]))[0]


def rel(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """name -> (HF folder, transformers model), made once per module."""
    made: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(name: str) -> tuple[Path, torch.nn.Module]:
        if name not in made:
            path = tmp_path_factory.mktemp(name) / "src"
            made[name] = (path, make_hf(CASES[name], path))
        return made[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_hf_import_and_export_match_transformers(folder, tmp_path, name):
    src, ref = folder(name)
    x = ids(src)
    assert len(x) > (CASES[name].config.get("sliding_window") or 0), "the text must run past the window"
    ours = ours_from(src)
    assert (our_logits(ours, x) - hf_logits(ref, x)).abs().max().item() <= TOL
    out = write_hf_folder(to_hf(ours, {}, None), tmp_path / "out")
    back = getattr(transformers, CASES[name].model_class).from_pretrained(out).eval()
    assert (hf_logits(back, x) - hf_logits(ref, x)).abs().max().item() <= TOL
    assert load_hf_folder(out).model_config == load_hf_folder(src).model_config | {"name": "out"}


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", GGUF_CASES)
def test_gguf_export_runs_in_llamacpp(folder, tmp_path, name):
    """Our f32 GGUF in llama.cpp: its logits and its greedy continuation are ours."""
    llama_cpp = pytest.importorskip("llama_cpp")
    src, _ = folder(name)
    ours, x = ours_from(src), ids(src)
    out = export_gguf(ours, META, src / "tokenizer.json", tmp_path / "m.gguf", "f32")
    assert rel(llamacpp_logits(out, x), our_logits(ours, x)) <= 2e-3
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, verbose=False, seed=0)
    try:
        theirs = [t for t, _ in zip(llm.generate(x, temp=0.0, top_k=1, reset=True), range(12), strict=False)]
    finally:
        llm.close()
    mine = ours.generate(torch.tensor([x]), 12, temperature=0)[0, len(x) :].tolist()
    assert theirs == mine


@pytest.mark.parametrize("name", REFUSED_GGUF_CASES)
def test_gguf_export_refuses_what_llamacpp_cannot_compute(folder, tmp_path, name):
    """A case llama.cpp would run wrong (a feature its architecture lacks): the GGUF export and the llama.cpp
    adapter export refuse in one line, and no file appears."""
    src, _ = folder(name)
    model, tok = lora_model(src, CASES[name]), src / "tokenizer.json"
    with pytest.raises(UserError, match=CASES[name].gguf_refuses) as refused:
        export_gguf(model, META, tok, tmp_path / "m.gguf", "f32")
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match=CASES[name].gguf_refuses):
        export_gguf_lora(model, {**META, "adapter": {}}, tmp_path / "adapter.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("name", GGUF_CASES)
def test_llamacpp_quantized_files_import(tmp_path, name, ftype):
    """A file llama.cpp quantized from ours comes back with the logits llama.cpp computes on it (up to its
    activation quantization), closer to them than to the unquantized model's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from gguf import GGUFReader

    case = CASES[name]
    src = tmp_path / "src"
    make_hf(case, src, **case.wide)
    ours, x = ours_from(src), ids(src)
    f32 = export_gguf(ours, META, src / "tokenizer.json", tmp_path / "f32.gguf", "f32")
    dst = tmp_path / f"{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(dst).encode(), params) == 0
    kinds = {t.tensor_type.name for t in GGUFReader(dst).tensors}
    assert ftype.split("_")[0] + "_" + ftype.split("_")[1][0] in kinds, kinds
    back = ours_from(dst)
    theirs = llamacpp_logits(dst, x)
    mine = our_logits(back, x)
    assert rel(theirs, mine) <= 0.05
    assert rel(theirs, mine) < rel(theirs, our_logits(ours, x))


def lora_model(src: Path, case: FamilyCase) -> torch.nn.Module:
    """Our model of ``src`` with LoRA on ``case.lora_targets`` and random (non-zero) B's."""
    model = ours_from(src)
    apply_lora(model, LoRAConfig(rank=2, alpha=3.0, targets=case.lora_targets))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for b in layer.lora_b.values():
                b.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("name", list(CASES))
def test_peft_folder_loads_in_peft(folder, tmp_path, name):
    peft = pytest.importorskip("peft")
    src, ref = folder(name)
    model, x = lora_model(src, CASES[name]), ids(src)
    out = write_peft_folder(model, {"adapter": {"alpha": 3.0}}, tmp_path / "peft")
    base = getattr(transformers, CASES[name].model_class).from_pretrained(src).eval()
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    assert (hf_logits(theirs, x) - our_logits(model, x)).abs().max().item() <= TOL
    assert (hf_logits(ref, x) - our_logits(model, x)).abs().max().item() > 1e-2  # the adapter does something


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", GGUF_CASES)
def test_llamacpp_adapter_equals_merged(folder, tmp_path, name):
    """base.gguf + adapter.gguf in llama.cpp == the merged GGUF in llama.cpp == our LoRA model."""
    llama_cpp = pytest.importorskip("llama_cpp")
    src, _ = folder(name)
    model, x = lora_model(src, CASES[name]), ids(src)
    tok = src / "tokenizer.json"
    base = export_gguf(ours_from(src), META, tok, tmp_path / "base.gguf", "f32")
    merged = export_gguf(model, META, tok, tmp_path / "merged.gguf", "f32")
    adapter = export_gguf_lora(model, {**META, "adapter": {}}, tmp_path / "adapter.gguf")
    llm = llama_cpp.Llama(model_path=str(base), lora_path=str(adapter), logits_all=True, n_ctx=128, verbose=False)
    try:
        llm.eval(x)
        with_adapter = np.array(llm.scores[: len(x)])
    finally:
        llm.close()
    if CASES[name].adapter_exact:
        assert rel(with_adapter, llamacpp_logits(merged, x)) <= 1e-4
    assert rel(with_adapter, our_logits(model, x)) <= 2e-3


def test_export_gguf_of_a_model_without_gguf_form_fails_before_training(tmp_path, cache_dir):
    """A windowed Mistral has no llama.cpp form: a run asking for export=gguf stops at setup, in one line."""
    run = tmp_path / "run"
    r = run_abi(
        ["recipe=llm", "model=mistral-tiny", "export=gguf", "trainer.max_steps=2", "data.seq_len=32"]
        + [f"data.cache_dir={cache_dir}", f"hydra.run.dir={run}"]
    )
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "export=gguf: a mistral-style model with sliding_window=32" in line and "export=none" in line
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize(
    ("style", "switch"),
    [("llama", {"qk_norm": True}), ("qwen2", {"sliding_window": 8}), ("gpt2", {"attn_softcap": 5.0})]
    + [("qwen3", {"embed_scale": True}), ("phi3", {"nope_layers": [1]})],
)
def test_a_switch_the_family_cannot_carry_is_refused(tmp_path, style, switch):
    """Exporting a model with a decoder switch its family's files have no place for would write another model:
    refused in one line naming the switch (HF and GGUF), nothing written."""
    from abi_train.errors import UserError

    model = build_model({"arch": "gpt", "style": style, "vocab_size": 64, "n_layer": 2, **switch})
    (key,) = switch
    with pytest.raises(UserError, match=f"a style={style} model with {key}=.* has no HF form"):
        to_hf(model, {}, None)
    tiny_tokenizer(tmp_path)
    with pytest.raises(UserError, match=f"a style={style} model with {key}=.* has no GGUF form"):
        export_gguf(model, META, tmp_path / "tokenizer.json", tmp_path / "m.gguf", "f32")
    assert not list(tmp_path.glob("m.gguf*"))
