"""The models this machine has, for ``python -m abi_train.models``: the Hugging Face cache's (``scan_cache_dir``)
and the packaged ones (``sources.PACKAGED``).

Each comes with its architecture and parameter count, read from config.json and the safetensors or GGUF
headers without loading a weight, its size on disk, and whether abi_train loads it: the answer of the real
loader (``load_pretrained`` reads the config and tokenizer; the weights stay lazy), so "why not" is the very
line an ``init_from=`` of it would print.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from abi_train import hub
from abi_train.errors import UserError
from abi_train.sources import PACKAGED, load_pretrained, packaged_model


@dataclass(frozen=True)
class Model:
    """One model on disk, under the name ``init_from`` takes for it."""

    name: str
    source: str  # "hf cache" | "packaged" | "local"
    path: Path | None  # None: a packaged model whose package is not installed (``missing`` says so)
    size: int | None = None  # bytes on disk
    revision: str | None = None  # the HF cache snapshot's commit hash
    refs: tuple[str, ...] = ()  # the branches / tags that point at it
    missing: str | None = None


@dataclass(frozen=True)
class Facts:
    architecture: str | None  # config.json's architectures[0] (timm's architecture, "open_clip") or GGUF's
    parameters: int | None  # None: not countable without loading (pytorch_model.bin) or unreadable
    loadable: str  # "yes", or the loader's one line


def models() -> list[Model]:
    """The HF cache's models (one row per cached revision; a GGUF repo: one per GGUF file), then the packaged."""
    return cached_models() + packaged_models()


def cached_models() -> list[Model]:
    """What ``scan_cache_dir`` finds in the cache huggingface_hub uses, named as init_from takes it: ``org/name``
    for the revision refs/main names, ``org/name@ref`` (or ``@commit``) for another, ``:QUANT`` for a GGUF file."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.utils import CacheNotFound

    try:
        repos = scan_cache_dir(hub.cache_dir()).repos
    except CacheNotFound:
        return []
    out = []
    for repo in sorted(repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: ("main" not in r.refs, -r.last_modified)):
            refs = tuple(sorted(rev.refs))
            at = "" if "main" in refs else "@" + (refs[0] if refs else rev.commit_hash)
            base = Model(repo.repo_id + at, "hf cache", rev.snapshot_path, rev.size_on_disk, rev.commit_hash, refs)
            files = hub.snapshot_files(rev.snapshot_path)
            ggufs = hub.gguf_files(files) if not any(c in files for c in hub.CONFIGS) else []
            out += [base] if not ggufs else [_gguf_model(base, f) for f in ggufs]
    return out


def _gguf_model(snapshot: Model, file: str) -> Model:
    path = snapshot.path / file
    tag = hub.quant_of(file) or Path(file).stem
    return replace(snapshot, name=f"{snapshot.name}:{tag}", path=path, size=path.stat().st_size)


def packaged_models() -> list[Model]:
    """PACKAGED's names, installed or not (then the line saying which package brings it)."""
    out = []
    for name in PACKAGED:
        try:
            path = packaged_model(name)
        except UserError as e:
            out.append(Model(name, "packaged", None, missing=str(e)))
            continue
        out.append(Model(name, "packaged", path, path.stat().st_size))
    return out


def local_path(name: str) -> Path:
    """The file or folder NAME stands for as init_from reads it (a hub id: only from the cache, no download)."""
    if hub.is_hub_id(name):
        return hub.resolve(name, download=False)
    if name.lower() in PACKAGED and not Path(name).exists():
        return packaged_model(name.lower())
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(
            f"{name!r} is not a local path, a packaged model ({', '.join(PACKAGED)}) nor a Hugging Face hub id "
            "(org/name, org/name@revision, org/name:QUANT)"
        )
    return path


def find(name: str) -> Model:
    """The model NAME names: its row of ``models()`` when it is one of them, else a local path's."""
    path = local_path(name)
    for model in models():
        if model.path is not None and _same(model.path, path):
            return model
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return Model(name, "local", path, sum(p.stat().st_size for p in files))


def _same(a: Path, b: Path) -> bool:
    # Not Path.resolve() on the paths themselves: a cache snapshot's files are links to shared blobs.
    return (a.parent.resolve(), a.name) == (b.parent.resolve(), b.name)


def facts(model: Model) -> Facts:
    """What the list shows of a model; "loadable" from ``load_pretrained`` itself, so it cannot disagree with a run."""
    if model.path is None:
        return Facts(None, None, str(model.missing))
    architecture, parameters = _gguf_facts(model.path) if model.path.is_file() else _folder_facts(model.path)
    try:
        load_pretrained(model.path)
    except UserError as e:
        return Facts(architecture, parameters, str(e))
    return Facts(architecture, parameters, "yes")


def _gguf_facts(path: Path) -> tuple[str | None, int | None]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError):
        return None, None
    arch = reader.fields.get("general.architecture")
    return (str(arch.contents()) if arch else None), sum(int(t.n_elements) for t in reader.tensors)


def _folder_facts(path: Path) -> tuple[str | None, int | None]:
    return _architecture(path), _safetensors_parameters(path)


def _architecture(path: Path) -> str | None:
    if (path / "open_clip_config.json").is_file():
        return "open_clip"
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    archs = config.get("architectures")
    return str(archs[0]) if isinstance(archs, list) and archs else config.get("architecture")  # timm's


def _safetensors_parameters(path: Path) -> int | None:
    """The parameter count of the weight files the loader would read, from the safetensors headers alone."""
    from safetensors import SafetensorError, safe_open

    from abi_train.hf import open_hf_folder

    try:
        files = open_hf_folder(path).weight_files
        if not all(f.suffix == ".safetensors" for f in files):
            return None  # pytorch_model.bin: counted only by unpickling it
        total = 0
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118 (not iterable)
    except (UserError, SafetensorError, OSError):
        return None
    return total


def count(n: int | None) -> str:
    """135M, 1.5B: a parameter count the way model names say it."""
    if n is None:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def size(n: int | None) -> str:
    """Bytes, in decimal units (as the hub shows file sizes)."""
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def print_list() -> None:
    """``python -m abi_train.models list``: one table row per model; why one does not load, in a note below
    the table (as wide as the terminal: the reasons are long)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(caption=f"Hugging Face cache: {hub.cache_dir()}")
    table.add_column("name", overflow="fold")
    table.add_column("architecture", overflow="fold")
    table.add_column("parameters", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("loadable", no_wrap=True)
    notes = []
    for m in models():
        f = facts(m)
        if f.loadable != "yes":
            notes.append(f"({len(notes) + 1}) {m.name}: {_short(f.loadable, m)}")
        loadable = "yes" if f.loadable == "yes" else f"no ({len(notes)})"
        table.add_row(m.name, f.architecture or "?", count(f.parameters), size(m.size), loadable)
    console = Console(markup=False, highlight=False)
    console.print(table)
    for note in notes:
        console.print(note)
    if notes:
        console.print("The whole line: python -m abi_train.models info NAME")


def _short(reason: str, model: Model) -> str:
    """The loader's line without the (long) snapshot path, which the row names, and without what follows its
    first "; " (the lists of what is supported): ``info`` prints it whole."""
    if model.path is not None:
        reason = reason.replace(f"{model.path}/", "").replace(str(model.path), model.path.name)
    return reason.split("; ")[0]


def print_info(name: str) -> None:
    """``python -m abi_train.models info NAME``: the list's facts for one model, its revision and files."""
    model = find(name)
    f = facts(model)
    revision = f"{model.revision} ({', '.join(model.refs)})" if model.refs else model.revision
    parameters = (
        count(f.parameters)
        if f.parameters is None or f.parameters < 1000
        else f"{f.parameters:,} ({count(f.parameters)})"
    )
    rows = [
        ("name", model.name),
        ("source", model.source),
        ("path", str(model.path) if model.path else "-"),
        ("revision", revision or "-"),
        ("architecture", f.architecture or "?"),
        ("parameters", parameters),
        ("size", size(model.size)),
        ("loadable", f.loadable),
    ]
    for key, value in rows:
        print(f"{key:<13} {value}")
    if model.path is not None:
        print("files")
        files = [model.path] if model.path.is_file() else sorted(p for p in model.path.rglob("*") if p.is_file())
        for file in files:
            shown = file.name if file == model.path else file.relative_to(model.path).as_posix()
            print(f"  {shown}  {size(file.stat().st_size)}")
