"""init_from=org/name: Hugging Face hub ids resolved through an HF cache built by hand (refs/, snapshots/,
no blobs/) with HF_HUB_OFFLINE=1 and huggingface_hub's download functions replaced by ones that fail, so no
test reaches the network; `python -m abi_train.models list | info | path` in subprocesses on that cache."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from conftest import run_abi
from huggingface_hub import constants
from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import save_file
from test_hf_llm import make_hf, ours_from, tiny_tokenizer

from abi_train import hub
from abi_train.errors import UserError
from abi_train.sources import load_pretrained

MAIN, OTHER, GGUF, MAMBA = "a1" * 20, "b2" * 20, "c3" * 20, "d4" * 20
DUMMY_GGUFS = ("tiny-Q4_K_M.gguf", "tiny-IQ4_XS.gguf", "tiny.Q4_0.gguf", "mmproj-tiny-Q8_0.gguf")


def snapshot(cache: Path, repo_id: str, commit: str, *refs: str) -> Path:
    """models--org--name/refs/<ref> naming ``commit``, and its empty snapshots/<commit>/ folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    path = repo / "snapshots" / commit
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> Path:
    """org/tiny at main (tied Llama) and at refs/other (GQA Llama); org/tiny-GGUF with a real Q8_0 file among
    dummy ones of other quants and a vision projector; org/mamba, whose architecture abi_train does not read."""
    from abi_train.export import export_gguf

    cache = tmp_path_factory.mktemp("hf") / "hub"
    main = snapshot(cache, "org/tiny", MAIN, "main")
    make_hf("llama-tied", main)
    tiny_tokenizer(main)
    other = snapshot(cache, "org/tiny", OTHER, "other")
    make_hf("llama-gqa", other)
    tiny_tokenizer(other)
    ggufs = snapshot(cache, "org/tiny-GGUF", GGUF, "main")
    export_gguf(ours_from(main), {"family": "llm"}, main / "tokenizer.json", ggufs / "tiny-Q8_0.gguf", "q8_0")
    for name in DUMMY_GGUFS:
        (ggufs / name).write_bytes(b"GGUF not really")
    mamba = snapshot(cache, "org/mamba", MAMBA, "main")
    (mamba / "config.json").write_text('{"architectures": ["MambaForCausalLM"], "hidden_size": 8}')
    save_file({"backbone.embeddings.weight": torch.zeros(4, 8)}, mamba / "model.safetensors")
    return cache


def _raises(error: Exception):
    def fail(*args, **kwargs):
        raise error

    return fail


_no_network = _raises(AssertionError("a test reached for the Hugging Face hub"))


@pytest.fixture
def offline(hf_cache, monkeypatch) -> Path:
    """HF_HUB_CACHE=hf_cache, HF_HUB_OFFLINE=1 for subprocesses and (as huggingface_hub read them at import)
    for this one; every download function fails and snapshot_download answers from the cache only."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HOME", str(hf_cache.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    real = huggingface_hub.snapshot_download

    def cache_only(*args, local_files_only=False, **kwargs):
        assert local_files_only, "a test reached for the Hugging Face hub"
        return real(*args, local_files_only=True, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", _no_network)
    return hf_cache


def one_line_error(fn, *fragments: str) -> str:
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg
    return msg


def test_hub_id_loads_the_cached_snapshot(offline):
    """init_from=org/name reads refs/main's snapshot: the config the folder itself gives (named after the
    repo, not the commit), its tokenizer, and a description naming both the id and the snapshot."""
    main = offline / "models--org--tiny" / "snapshots" / MAIN
    got, folder = load_pretrained("org/tiny"), load_pretrained(main)
    assert got.path == main and got.kind == "hf" and got.hub_id == "org/tiny"
    assert got.model_config == folder.model_config | {"name": "tiny"}
    assert got.tokenizer.hf.get_vocab() == folder.tokenizer.hf.get_vocab()
    assert got.describe() == f"hf org/tiny ({main})" and folder.describe() == f"hf {main}"


def test_revision_picks_another_snapshot(offline):
    other = offline / "models--org--tiny" / "snapshots" / OTHER
    for text in ("org/tiny@other", f"org/tiny@{OTHER}"):
        got = load_pretrained(text)
        assert got.path == other and got.model_config["n_kv_head"] == 2, text
    assert load_pretrained("org/tiny").model_config["n_kv_head"] == 4
    one_line_error(lambda: load_pretrained("org/tiny@v9"), "'org/tiny@v9' is not", "it has org/tiny at main, other")


def test_quant_tag_picks_the_gguf_file(offline):
    """:QUANT matches the tag in the file name case-insensitively and as a whole tag (Q4_K is not Q4_K_M, Q4_0
    not IQ4_0); no tag: Q4_K_M; vision projectors (mmproj) are never the model."""
    snap = offline / "models--org--tiny-GGUF" / "snapshots" / GGUF
    for text, file in [
        ("org/tiny-GGUF:Q8_0", "tiny-Q8_0.gguf"),
        ("org/tiny-GGUF:q8_0", "tiny-Q8_0.gguf"),
        ("org/tiny-GGUF", "tiny-Q4_K_M.gguf"),
        ("org/tiny-GGUF:iq4_xs", "tiny-IQ4_XS.gguf"),
        ("org/tiny-GGUF:Q4_0", "tiny.Q4_0.gguf"),
        (f"org/tiny-GGUF@{GGUF}:Q8_0", "tiny-Q8_0.gguf"),
    ]:
        assert hub.resolve(text) == snap / file, text
    got = load_pretrained("org/tiny-GGUF:Q8_0")
    assert got.kind == "gguf" and got.describe() == f"gguf org/tiny-GGUF:Q8_0 ({snap / 'tiny-Q8_0.gguf'})"
    assert got.model_config["n_layer"] == 2
    one_line_error(
        lambda: hub.resolve("org/tiny-GGUF:Q4_K"),
        "with GGUF files IQ4_XS, Q4_0, Q4_K_M, Q8_0)",
        "HF_HUB_OFFLINE is set",
    )


def test_missing_and_malformed_ids_are_one_line(offline, tmp_path, monkeypatch):
    one_line_error(
        lambda: load_pretrained("nobody/nothing"),
        "'nobody/nothing' is not a local path and is not in the Hugging Face cache",
        "unset it",
        "HF_HUB_OFFLINE=0 python -m abi_train.models download nobody/nothing",
    )
    for bad in ("org/tiny@", "org/na me", "org/tiny:"):
        one_line_error(lambda bad=bad: load_pretrained(bad), "neither a local path nor a Hugging Face hub id")
    one_line_error(lambda: hub.download("org/tiny"), "HF_HUB_OFFLINE is set")
    # a folder that exists wins over the hub id of the same spelling
    monkeypatch.chdir(tmp_path)
    shutil.copytree(offline / "models--org--tiny" / "snapshots" / OTHER, tmp_path / "org" / "tiny")
    got = load_pretrained("org/tiny")
    assert got.path == Path("org/tiny") and got.hub_id is None and got.model_config["n_kv_head"] == 2


def test_online_downloads_only_what_is_read(offline, monkeypatch, tmp_path):
    """Not cached and online: the repo's listing decides; a folder is downloaded with allow_patterns limited to
    the config, tokenizer and weight files; a GGUF repo's one file of the quant; no such quant lists the repo's."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    listing = ["config.json", "model.safetensors", "tokenizer.json", "README.md", "onnx/model.onnx"]
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, revision=None: listing)
    cache_only = huggingface_hub.snapshot_download  # the offline fixture's

    def snapshot_download(*args, local_files_only=False, **kwargs):
        if local_files_only:
            return cache_only(*args, local_files_only=True, **kwargs)
        calls.append((args, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **kw: calls.append((a, kw)) or "x.gguf")
    assert hub.resolve("new/model@v1") == tmp_path
    (repo_id,), kwargs = calls.pop()
    assert repo_id == "new/model" and kwargs["revision"] == "v1"
    assert kwargs["allow_patterns"] == hub.FOLDER_FILES + hub.SAFETENSORS
    listing[:] = ["README.md", "new-Q4_K_M.gguf", "new-Q8_0.gguf", "mmproj-new-f16.gguf"]
    assert hub.resolve("new/model-GGUF:Q8_0") == Path("x.gguf")
    assert calls.pop()[0] == ("new/model-GGUF", "new-Q8_0.gguf")
    one_line_error(lambda: hub.resolve("new/model-GGUF:Q2_K"), "has GGUF files Q4_K_M, Q8_0, none Q2_K")
    listing[:] = ["config.json", "pytorch_model.bin"]  # no safetensors: the weights the loader reads instead
    hub.resolve("old/model")
    assert calls.pop()[1]["allow_patterns"] == hub.FOLDER_FILES + hub.PYTORCH_BIN

    response = SimpleNamespace(headers={}, request=None)  # what huggingface_hub's HTTP errors keep of the answer
    for error, fragment in [
        (RevisionNotFoundError("404", response=response), "new/model@v9: the hub repo new/model has no revision 'v9'"),
        (GatedRepoError("403", response=response), "new/model is gated: accept its terms"),
        (RepositoryNotFoundError("404", response=response), "is not a local path, and the hub has no model repo"),
        (ConnectionError("Name or service not known"), "could not download from the Hugging Face hub: Name or"),
    ]:
        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", _raises(error))
        one_line_error(lambda: hub.resolve("new/model@v9"), fragment)


def test_models_cli_list_info_path(offline):
    """The CLI sees the cache the environment names: every cached model with its architecture, parameter
    count and loadability (the loader's own reason when not), `path` the snapshot, `info` its files."""
    env = {"COLUMNS": "400"}
    r = run_abi(["list"], module="abi_train.models", env=env)
    assert r.returncode == 0, r.stderr
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.count("│") >= 5}
    assert {"org/tiny", "org/tiny@other", "org/tiny-GGUF:Q8_0", "org/mamba", "smollm2-135m-instruct"} <= set(rows)
    tiny = load_pretrained("org/tiny")
    n_params = sum(p.numel() for p in ours_from(tiny.path).parameters())
    assert "LlamaForCausalLM" in rows["org/tiny"] and rows["org/tiny"].rstrip(" │").endswith("yes")
    assert f"{n_params / 1e3:.3g}K" in rows["org/tiny"]
    assert "llama" in rows["org/tiny-GGUF:Q8_0"] and rows["org/tiny-GGUF:Q8_0"].rstrip(" │").endswith("yes")
    assert "mmproj" not in r.stdout
    assert "MambaForCausalLM" in rows["org/mamba"] and " no (" in rows["org/mamba"]
    assert "org/mamba: config.json: architecture 'MambaForCausalLM' is not supported\n" in r.stdout
    assert "org/tiny-GGUF:Q4_K_M: not a readable GGUF file: tiny-Q4_K_M.gguf" in r.stdout

    r = run_abi(["path", "org/tiny"], module="abi_train.models", env=env)
    assert r.returncode == 0 and r.stdout == f"{offline / 'models--org--tiny' / 'snapshots' / MAIN}\n", r.stderr
    r = run_abi(["info", "org/tiny@other"], module="abi_train.models", env=env)
    assert r.returncode == 0, r.stderr
    assert f"revision      {OTHER} (other)" in r.stdout and "LlamaForCausalLM" in r.stdout
    assert "loadable      yes" in r.stdout and "\n  model.safetensors  " in r.stdout


def test_models_cli_errors_are_one_line(offline, monkeypatch, capsys):
    from abi_train.models.__main__ import main

    for args, fragment in [
        (["path", "nobody/nothing"], "not in the Hugging Face cache"),
        (["download", "org/tiny"], "HF_HUB_OFFLINE is set"),
        (["info", "org/tiny@"], "neither a local path nor a Hugging Face hub id"),
        (["info", "no_such_dir"], "is not a local path, a packaged model (smollm2-135m-instruct) nor"),
    ]:
        monkeypatch.setattr("sys.argv", ["python -m abi_train.models", *args])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and fragment in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_hf_home_names_the_cache(offline, monkeypatch):
    """Without HF_HUB_CACHE the cache is HF_HOME/hub, as huggingface_hub has it."""
    monkeypatch.delenv("HF_HUB_CACHE")
    r = run_abi(["path", "org/tiny-GGUF:Q8_0"], module="abi_train.models")
    assert (
        r.returncode == 0
        and r.stdout == f"{offline / 'models--org--tiny-GGUF' / 'snapshots' / GGUF / 'tiny-Q8_0.gguf'}\n"
    )


def test_train_from_a_hub_id(offline, tmp_path, cache_dir):
    """A training run with init_from=org/name, offline: it starts from the snapshot and its log says so."""
    run = tmp_path / "run"
    r = run_abi(
        ["recipe=llm", "init_from=org/tiny", "data.seq_len=32", "trainer.max_steps=1", "trainer.batch_size=2"]
        + ["trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.progress=false", f"data.cache_dir={cache_dir}"]
        + [f"hydra.run.dir={run}"]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    snap = offline / "models--org--tiny" / "snapshots" / MAIN
    assert f"init_from=org/tiny: hf org/tiny ({snap})" in (run / "train.log").read_text()
