"""Check abi_train's timm and open_clip import against the libraries themselves (no downloads).

    python scripts/check_timm_open_clip.py [--out DIR]

Where timm / open_clip import (the test machine's torch breaks their torchvision, so the test suite only
checks these formats for self-consistency), build models with random weights (``pretrained=False`` /
``pretrained=None``, every parameter perturbed so LayerNorms and biases are not at their init), save them
in the hub folder layouts (timm: config.json with "architecture", "num_classes", "pretrained_cfg" (and
"model_args") + model.safetensors via timm's own ``save_for_hf``; open_clip: open_clip_config.json with
"model_cfg" / "preprocess_cfg" + open_clip_model.safetensors), import each with ``init_from``'s loader and
print one JSON line per check: the max abs difference of logits / unit embeddings / logit scale in fp32 on
CPU. Exits 1 when a check exceeds 1e-4 (or a library is missing with --require).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from abi_train.models import build_model
from abi_train.sources import load_pretrained
from abi_train.weights import load_pretrained_weights

TOL = 1e-4
failures: list[str] = []


def report(check: str, diff: float, **extra: Any) -> None:
    ok = diff <= TOL
    if not ok:
        failures.append(check)
    print(json.dumps({"check": check, "max_abs_diff": diff, "ok": ok, **extra}), flush=True)


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def ours(folder: Path) -> torch.nn.Module:
    pretrained = load_pretrained(folder)
    model = build_model(pretrained.model_config).eval()
    load_pretrained_weights(model, pretrained)
    return model


def check_timm(root: Path) -> None:
    import timm
    from timm.models import _hub

    cases = {
        "timm/vit_tiny_patch16_224": ("vit_tiny_patch16_224", {}),
        "timm/vit_tiny_patch16_224(img 64, patch 8, 2 blocks, 5 classes)": (
            "vit_tiny_patch16_224",
            dict(img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=3, num_classes=5),
        ),
        "timm/vit_small_patch16_224(pre_norm)": ("vit_small_patch16_224", dict(depth=2, pre_norm=True)),
    }
    for i, (check, (name, kwargs)) in enumerate(cases.items()):
        model = perturb(timm.create_model(name, pretrained=False, **kwargs), i)
        folder = root / f"timm{i}"
        _hub.save_for_hf(model, folder, model_args=kwargs or None, safe_serialization=True)
        size = kwargs.get("img_size", 224)
        images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            report(check, (ours(folder)(images) - model(images)).abs().max().item())


def check_open_clip(root: Path) -> None:
    import open_clip

    tiny = {
        "embed_dim": 64,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 96, "heads": 4, "layers": 2},
    }
    cases = {
        "open_clip/tiny(quick_gelu)": tiny,
        "open_clip/tiny(gelu)": {**tiny, "quick_gelu": False},
        "open_clip/ViT-B-32": open_clip.get_model_config("ViT-B-32"),
        "open_clip/ViT-B-32-quickgelu": open_clip.get_model_config("ViT-B-32-quickgelu"),
    }
    for i, (check, cfg) in enumerate(cases.items()):
        model = perturb(open_clip.CLIP(**cfg), 10 + i)
        folder = root / f"open_clip{i}"
        folder.mkdir()
        preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "open_clip_model.safetensors"))
        size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"].get("context_length", 77)
        gen = torch.Generator().manual_seed(i)
        images = torch.randn(2, 3, size, size, generator=gen)
        ids = torch.randint(1, 49407, (2, ctx), generator=gen)
        ids[0, 5], ids[0, 6:] = 49407, 0  # open_clip's tokenizer: [SOT] words [EOT] then zeros
        ids[1, -1] = 49407
        with torch.no_grad():
            img, txt, scale, _ = ours(folder)(images, ids)
            ref_img = F.normalize(model.encode_image(images), dim=-1)
            ref_txt = F.normalize(model.encode_text(ids), dim=-1)
        report(f"{check} image", (img - ref_img).abs().max().item())
        report(f"{check} text", (txt - ref_txt).abs().max().item())
        report(f"{check} logit_scale", abs(scale.item() - model.logit_scale.exp().item()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="keep the folders here (default: a temp dir, removed)")
    parser.add_argument("--require", action="store_true", help="fail when timm or open_clip does not import")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for lib, check in (("timm", check_timm), ("open_clip", check_open_clip)):
            try:
                __import__(lib)
            except Exception as e:  # noqa: BLE001 (an import can fail in many ways: torchvision, ABI)
                print(json.dumps({"check": lib, "skipped": f"{type(e).__name__}: {e}"}), flush=True)
                if args.require:
                    failures.append(lib)
                continue
            check(root)
    if failures:
        print(f"FAILED: {', '.join(failures)}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
