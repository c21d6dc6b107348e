"""Hugging Face hub ids as ``init_from``: ``org/name``, ``org/name@revision``, ``org/name:QUANT``.

An id resolves to a local path the loaders read: a snapshot folder of the HF cache, or one GGUF file in it.
The cache comes first (huggingface_hub's own: ``HF_HOME`` / ``HF_HUB_CACHE``); only when the model is not
there and ``HF_HUB_OFFLINE`` is unset is it downloaded, and then only the files abi_train reads. A path that
exists always wins over an id spelled the same. ``:QUANT`` picks a GGUF repo's file by its quantization tag,
as llama.cpp's ``-hf repo:quant`` does (without one, Q4_K_M, else the first file).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from abi_train.errors import UserError

# What a model folder download fetches: the files the Hugging Face loaders read (hf/, data/tokenizer.py).
FOLDER_FILES = [
    "config.json",
    "open_clip_config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.json",
    "chat_template.jinja",
]
SAFETENSORS = ["*.safetensors", "*.safetensors.index.json"]
PYTORCH_BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]  # a repo without safetensors
CONFIGS = ("config.json", "open_clip_config.json")
DEFAULT_QUANT = "Q4_K_M"  # llama.cpp's choice for a GGUF repo named without a tag

_ID = re.compile(r"(?P<repo>[^@:/]+/[^@:/]+)(?:@(?P<revision>[^:@]+))?(?::(?P<quant>[^:@/]+))?")
# A quantization tag in a GGUF file name: Q4_K_M, IQ4_XS, Q8_0, F16, BF16, ... (what listings call the file).
_QUANT = re.compile(r"(?<![A-Za-z0-9])(I?Q[0-9]+(?:_[A-Z0-9]+)*|BF16|F16|F32)(?![A-Za-z0-9])", re.IGNORECASE)
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


@dataclass(frozen=True)
class HubRef:
    """A parsed hub id; ``text`` as the user typed it."""

    text: str
    repo_id: str
    revision: str | None = None
    quant: str | None = None


def is_hub_id(path: str | Path) -> bool:
    """PATH is meant as a hub id: no such local path, and shaped ``org/name`` (one slash before any ``@`` or
    ``:``, not ``./``, ``/`` or ``~``). A malformed id still counts, so that ``parse`` can say what is wrong."""
    text = str(path)
    repo = re.split("[@:]", text, maxsplit=1)[0]
    return repo.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists()


def parse(text: str) -> HubRef:
    """``org/name[@revision][:QUANT]``, checked with huggingface_hub's own repo id rules."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    m = _ID.fullmatch(text)
    reason = "expected org/name, org/name@revision or org/name:QUANT"
    if m:
        try:
            validate_repo_id(m["repo"])
        except HFValidationError as e:
            m, reason = None, str(e).splitlines()[0]
    if m is None:
        raise UserError(f"{text!r} is neither a local path nor a Hugging Face hub id ({reason})")
    return HubRef(text, m["repo"], m["revision"], m["quant"])


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), as huggingface_hub read it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> Path:
    """The HF cache folder huggingface_hub uses (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve(text: str, download: bool = True) -> Path:
    """The local path hub id TEXT names: its cached snapshot folder (or GGUF file), else, with ``download``
    and not offline, what ``fetch`` downloads. Not there: a UserError saying how to get it."""
    ref = parse(text)
    snapshot = cached_snapshot(ref)
    files = snapshot_files(snapshot) if snapshot is not None else []
    if snapshot is not None:
        if wants_gguf(ref, files):
            matches = gguf_matches(ref, files)
            if matches:
                return snapshot / single_file(ref, matches[0])
        elif any(c in files for c in CONFIGS) and any(f.endswith((".safetensors", ".bin")) for f in files):
            return snapshot
    if download and not offline():
        return fetch(ref)
    if snapshot is not None and wants_gguf(ref, files):
        held = f" (it has {ref.repo_id} with {_quant_list(files)})"
    elif snapshot is not None:
        held = f" (it has files of {ref.repo_id}, but not config.json and weights)"
    else:
        revisions = cached_revisions(ref.repo_id)
        held = f" (it has {ref.repo_id} at {', '.join(revisions)})" if revisions else ""
    command = f"python -m abi_train.models download {text}"
    if not offline():
        how = f"download it: {command}"
    elif download:
        how = f"HF_HUB_OFFLINE is set: unset it for init_from to download it, or first: HF_HUB_OFFLINE=0 {command}"
    else:
        how = f"HF_HUB_OFFLINE is set: download it with HF_HUB_OFFLINE=0 {command}"
    raise UserError(f"{text!r} is not a local path and is not in the Hugging Face cache {cache_dir()}{held}; {how}")


def download(text: str) -> Path:
    """``python -m abi_train.models download ID``: fetch ID from the hub even when it is cached (the newest
    revision of a branch); offline, a UserError."""
    ref = parse(text)
    if offline():
        raise UserError(f"cannot download {text}: HF_HUB_OFFLINE is set; unset it (downloading needs the network)")
    return fetch(ref)


def fetch(ref: HubRef) -> Path:
    """Download what ``ref`` names into the HF cache (huggingface_hub's progress bars): one GGUF file, or a
    model folder's config, tokenizer and weight files (safetensors; pytorch_model.bin where it has none)."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    with hub_errors(ref):
        files = HfApi().list_repo_files(ref.repo_id, revision=ref.revision)
        if wants_gguf(ref, files):
            matches = gguf_matches(ref, files)
            if not matches:
                raise UserError(f"{ref.text}: the hub repo {ref.repo_id} has {_quant_list(files)}, none {ref.quant}")
            name = single_file(ref, matches[0])
            return Path(hf_hub_download(ref.repo_id, name, revision=ref.revision))
        weights = SAFETENSORS if any(f.endswith(".safetensors") for f in files) else PYTORCH_BIN
        patterns = FOLDER_FILES + weights
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns))


@contextlib.contextmanager
def hub_errors(ref: HubRef) -> Iterator[None]:
    """The hub's answers (no such repo or revision, gated, unreachable) as one-line UserErrors."""
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    # The transport library's errors (httpx's or requests'), which HfHubHTTPError derives from: no network.
    transport = (OSError, *HfHubHTTPError.__bases__)
    try:
        yield
    except RevisionNotFoundError:
        raise UserError(f"{ref.text}: the hub repo {ref.repo_id} has no revision {ref.revision!r}") from None
    except GatedRepoError:
        raise UserError(
            f"{ref.text}: {ref.repo_id} is gated: accept its terms on the hub, then log in (hf auth login or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{ref.text!r} is not a local path, and the hub has no model repo {ref.repo_id} "
            "(a private one needs hf auth login or HF_TOKEN)"
        ) from None
    except transport as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{ref.text}: could not download from the Hugging Face hub: {first}") from None


def cached_snapshot(ref: HubRef) -> Path | None:
    """The snapshot folder of ``ref``'s revision in the HF cache (refs/<branch> or a commit hash), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True))
    except LocalEntryNotFoundError as e:
        # huggingface_hub >= 2 says a snapshot misses some of the repo's files (IncompleteSnapshotError); we
        # download only some on purpose, and check that what we read is there.
        snapshot = getattr(e, "snapshot_path", None)
        return Path(snapshot) if snapshot else None


def cached_revisions(repo_id: str) -> list[str]:
    """The refs (else commit hashes) of ``repo_id``'s revisions in the HF cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.utils import CacheNotFound

    try:
        repos = scan_cache_dir().repos
    except CacheNotFound:
        return []
    revs = [r for repo in repos if repo.repo_id == repo_id and repo.repo_type == "model" for r in repo.revisions]
    return sorted(name for r in revs for name in (sorted(r.refs) or [r.commit_hash]))


def snapshot_files(snapshot: Path) -> list[str]:
    """The files of a snapshot folder, relative, '/'-separated (a broken link, a blob never fetched, is not)."""
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def wants_gguf(ref: HubRef, files: Iterable[str]) -> bool:
    """A GGUF file is wanted: a quant tag is given, or the repo has GGUF files and no model folder config."""
    files = list(files)
    return ref.quant is not None or (not any(c in files for c in CONFIGS) and bool(gguf_files(files)))


def gguf_files(files: Iterable[str]) -> list[str]:
    """The model GGUF files (not llama.cpp's vision projectors, mmproj-*)."""
    return sorted(f for f in files if f.lower().endswith(".gguf") and "mmproj" not in Path(f).name.lower())


def has_tag(file: str, tag: str) -> bool:
    """FILE's name carries the quant TAG, case-insensitively, as a whole tag (Q4_K is not Q4_K_M, nor Q4_0 IQ4_0)."""
    return re.search(rf"(?<![a-z0-9]){re.escape(tag)}(?![a-z0-9_])", Path(file).name, re.IGNORECASE) is not None


def gguf_matches(ref: HubRef, files: Iterable[str]) -> list[str]:
    """The GGUF files ``ref`` names: those of its quant tag; without one, Q4_K_M's, else the first file."""
    ggufs = gguf_files(files)
    if ref.quant is not None:
        return [f for f in ggufs if has_tag(f, ref.quant)]
    return [f for f in ggufs if has_tag(f, DEFAULT_QUANT)] or ggufs[:1]


def quant_of(file: str) -> str | None:
    """The quantization tag of a GGUF file name (its last one), upper-case, or None."""
    tags = _QUANT.findall(Path(file).name.removesuffix(".gguf"))
    return tags[-1].upper() if tags else None


def single_file(ref: HubRef, file: str) -> str:
    """FILE, unless it is one part of a split GGUF (``-00001-of-00003``), which abi_train's reader cannot read."""
    split = _SPLIT.search(file)
    if split:
        raise UserError(
            f"{ref.text}: {file} is part 1 of {int(split[2])} of a split GGUF; abi_train reads one-file GGUFs "
            "(merge them with llama.cpp's llama-gguf-split --merge and pass the file)"
        )
    return file


def _quant_list(files: Iterable[str]) -> str:
    """What a repo has in GGUF files: their quant tags (else names), or "no GGUF files"."""
    tags = sorted({quant_of(f) or Path(f).name for f in gguf_files(files)})
    return f"GGUF files {', '.join(tags)}" if tags else "no GGUF files"
