"""The reference training steps that abi_train's bench is compared against, timed the same way.

    python scripts/gpu_reference.py nanogpt --batch 32 [--bias] [--eager] [--sync]
    python scripts/gpu_reference.py nanogpt --shape cpu --batch 12 --device cpu --precision fp32 --eager --threads 2
    python scripts/gpu_reference.py timm-vit --batch 256
    python scripts/gpu_reference.py open-clip --batch 512
    python scripts/gpu_reference.py hf-llama --shape llama-135m --lora 16 --batch 8   (transformers + peft)
    python scripts/gpu_reference.py hf-family --shape gemma3-1b --batch 4   (any configs/model YAML's family)

Each builds the reference model on the GPU, one synthetic batch, bf16 autocast (--precision fp32: none, as
nanoGPT's train.py on a CPU), AdamW as the reference configures it, grad clip 1.0, torch.compile (unless
--eager), and prints one JSON line with the fields of ``python -m abi_train.bench``
(abi_train.bench.time_steps/report do the timing). nanoGPT's model.py is not vendored: put a copy of
karpathy/nanoGPT's model.py at .ref/nanogpt_model.py (git-ignored). timm, open_clip, transformers and peft are imported.
--sync adds one host sync per step (reading a finiteness flag), to price the trainer's per-step sync.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from abi_train.bench import report, time_steps, write_profile

# nanoGPT's model shapes: GPT-2 small, and the CPU shape of its README's "I only have a macbook" run
# (4 layers, 4 heads, 128 wide, block 64) with a 2048-token vocabulary.
NANOGPT_SHAPES = {
    "gpt2-124m": {"vocab_size": 50304, "n_layer": 12, "n_head": 12, "n_embd": 768},
    "cpu": {"vocab_size": 2048, "n_layer": 4, "n_head": 4, "n_embd": 128},
}


def nanogpt(batch: int, seq: int, device: torch.device, bias: bool = False, shape: str = "gpt2-124m"):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / ".ref"))
    from nanogpt_model import GPT, GPTConfig

    cfg = GPTConfig(block_size=seq, dropout=0.0, bias=bias, **NANOGPT_SHAPES[shape])
    model = GPT(cfg).to(device)
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device)
    data = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())  # nanoGPT's get_batch stacks rows
    # nanoGPT's estimate_mfu: 6N + 12 L d T, N = parameters without the position table (lm_head = wte counted)
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    flops = 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq
    loss_fn = lambda m, b: m(*b)[1]
    return model, opt, data, loss_fn, "tokens", batch * seq, flops, {"seq_len": seq, "bias": bias, "shape": shape}


def timm_vit(batch: int, size: int, device: torch.device):
    import timm

    model = timm.create_model("vit_base_patch16_224", num_classes=1000, img_size=size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(batch, 3, size, size, generator=gen).to(device), torch.randint(0, 1000, (batch,)).to(device))
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])
    flops = vit_flops(model, size, 16, 12, 768)
    return model, opt, data, loss_fn, "images", batch, flops, {"image_size": size}


def open_clip_b32(batch: int, size: int, device: torch.device):
    import open_clip

    model = open_clip.create_model("ViT-B-32").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.2, fused=True)
    clip_loss = open_clip.ClipLoss()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    text = torch.randint(1, 49407, (batch, 77), generator=gen).to(device)

    def loss_fn(m, b):
        image_features, text_features, logit_scale = m(*b)[:3]
        return clip_loss(image_features, text_features, logit_scale)

    v, t = model.visual, model.transformer
    text_flops = 6 * sum(p.numel() for p in t.parameters()) * 77 + 12 * t.layers * t.width * 77 * 77
    flops = vit_flops(v, size, 32, 12, 768) + text_flops
    return model, opt, (images, text), loss_fn, "pairs", batch, flops, {"image_size": size, "context": 77}


def vit_flops(vit: torch.nn.Module, size: int, patch: int, layers: int, width: int) -> float:
    """Training FLOPs per image: 6 x (matmul weights, position/class tables excluded) x tokens + attention."""
    tokens = (size // patch) ** 2 + 1
    tables = ("pos", "cls", "class")
    n = sum(p.numel() for name, p in vit.named_parameters() if p.ndim >= 2 and not any(t in name for t in tables))
    return 6 * n * tokens + 12 * layers * width * tokens * tokens


# transformers LlamaConfig kwargs of abi_train's configs/model/llama-135m.yaml and llama-1b.yaml.
HF_LLAMA_SHAPES = {
    "llama-135m": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rope_theta": 10000.0,
    },
    "llama-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
}


def hf_llama(batch: int, seq: int, device: torch.device, shape: str = "llama-135m", lora: int = 0):
    """transformers' LlamaForCausalLM (SDPA attention), randomly initialised; with ``lora`` > 0 a peft LoRA of
    that rank (alpha 2r) on q k v o gate up down, the base frozen, as abi_train's adapter=lora defaults."""
    import transformers

    config = transformers.LlamaConfig(
        **HF_LLAMA_SHAPES[shape],
        tie_word_embeddings=True,
        max_position_embeddings=max(seq, 2048),
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config).to(device)
    if lora:
        import peft

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=lora, lora_alpha=2 * lora, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(device)
    loss_fn = lambda m, b: m(input_ids=b, labels=b).loss
    c = config
    blocks = c.num_hidden_layers * (
        c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * (c.hidden_size // c.num_attention_heads)
        + c.hidden_size * c.hidden_size
        + 3 * c.hidden_size * c.intermediate_size
    )
    flops = 6 * (blocks + c.vocab_size * c.hidden_size) + 12 * c.num_hidden_layers * c.hidden_size * seq
    sizes = {"seq_len": seq, "shape": shape, "lora_rank": lora, "trainable_params": sum(p.numel() for p in params)}
    return model, opt, tokens, loss_fn, "tokens", batch * seq, flops, sizes


def hf_family(batch: int, seq: int, device: torch.device, shape: str = "qwen3-0.6b", lora: int = 0):
    """The transformers model of any abi_train model YAML (configs/model/SHAPE.yaml: Qwen3, Gemma 3, Phi, ...),
    its config.json from the family's own map, randomly initialised, SDPA attention (eager where transformers
    has no SDPA form: Gemma 2); ``lora`` as hf-llama."""
    import transformers
    import yaml

    from abi_train.cli import config_dir
    from abi_train.models.families import family
    from abi_train.models.gpt import gpt_config

    raw = yaml.safe_load((config_dir() / "model" / f"{shape}.yaml").read_text())
    cfg = gpt_config(raw | {"vocab_size": raw["vocab_size"] or 512})  # debug sizes take the tokenizer's: any
    hf = family(cfg.style).hf_config(cfg) | {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings}
    hf["max_position_embeddings"] = max(seq, hf.get("max_position_embeddings") or 0)
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except ValueError:  # Gemma 2: soft-capped scores, which SDPA cannot take
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.to(device)
    if lora:
        import peft

        targets = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj"]
        targets = [t for t in targets + ["down_proj"] if any(n.endswith(t) for n, _ in model.named_modules())]
        model = peft.get_peft_model(model, peft.LoraConfig(r=lora, lora_alpha=2 * lora, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    loss_fn = lambda m, b: m(input_ids=b, labels=b).loss
    with torch.device("meta"):
        from abi_train.models.gpt import GPT

        flops = GPT(cfg).flops_per_item()  # the same count as abi_train's bench reports
    sizes = {"seq_len": seq, "shape": shape, "lora_rank": lora, "trainable_params": sum(p.numel() for p in params)}
    return model, opt, tokens, loss_fn, "tokens", batch * seq, flops, sizes


WORKLOADS = {
    "nanogpt": (nanogpt, 1024),
    "timm-vit": (timm_vit, 224),
    "open-clip": (open_clip_b32, 224),
    "hf-llama": (hf_llama, 2048),
    "hf-family": (hf_family, 2048),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--size", type=int, help="sequence length or image size (default: the workload's)")
    ap.add_argument("--eager", action="store_true", help="no torch.compile")
    ap.add_argument("--bias", action="store_true", help="nanogpt: biases in Linears and LayerNorms, as GPT-2 has")
    ap.add_argument("--sync", action="store_true", help="one host sync per step")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a quick check of this script")
    ap.add_argument("--profile", metavar="FILE", help="after timing, write a kernel table of 3 steps to FILE")
    ap.add_argument("--shape", help="nanogpt: gpt2-124m (default) | cpu; hf-llama: llama-135m (default) | llama-1b")
    ap.add_argument("--lora", type=int, default=0, help="hf-llama: a peft LoRA of this rank (0: full fine-tuning)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="fp32: no autocast")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU runs)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    build, default_size = WORKLOADS[args.workload]
    device = torch.device(args.device)
    torch.manual_seed(1337)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = {"bias": True} if args.bias else {}
    if args.workload == "nanogpt":
        extra["shape"] = args.shape or "gpt2-124m"
        default_size = 64 if args.shape == "cpu" else default_size
    if args.workload == "hf-llama":
        extra.update(shape=args.shape or "llama-135m", lora=args.lora)
    if args.workload == "hf-family":
        extra.update(shape=args.shape or "qwen3-0.6b", lora=args.lora)
    model, opt, data, loss_fn, unit, items, flops, sizes = build(args.batch, args.size or default_size, device, **extra)
    model.train()
    run = model if args.eager else torch.compile(model)

    autocast = args.precision == "bf16"

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(run, data)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if args.sync:
            bool(torch.isfinite(norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    timing = time_steps(step, args.steps, args.warmup, device)
    if args.profile:
        write_profile(step, args.profile, device)
    losses = [round(float(x), 4) for x in timing["outputs"]]
    record = report(
        device,
        unit,
        items,
        flops,
        timing,
        reference=args.workload,
        batch=args.batch,
        **sizes,
        precision=args.precision,
        threads=torch.get_num_threads(),
        compile=not args.eager,
        sync=args.sync,
        loss_first=losses[0],
        loss_last=losses[-1],
    )
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
