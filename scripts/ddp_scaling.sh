# Weak scaling of GPT-2 124M on one host: 1 GPU, then GPUS (default 2) GPUs with DDP and with FSDP2, the same
# per-GPU batch (so the global batch grows with the GPUs). Each run is abi_train.bench: the real Trainer step
# (accumulation, clipping, gradient all-reduce / reduce-scatter) on a synthetic batch, median of 30 steps after
# warm-up and compilation. Prints the bench records, then one JSON line per run with tokens/s per GPU and the
# scaling efficiency against the 1-GPU run (goal: >= 0.95 with DDP). All lines also land in $OUT/results.jsonl.
# Device call (2 GPUs): bash scripts/ddp_scaling.sh   (kind nvidia-h100-x2; carry .site .whl; see scripts/gpu_env.sh)
source scripts/gpu_env.sh
GPUS="${GPUS:-2}"
GPT="${GPT:-recipe=llm model=gpt2-124m data.seq_len=1024 trainer.precision=bf16 trainer.compile=true
     trainer.batch_size=32 data.cache_dir=/tmp/abi bench.steps=30 bench.warmup=15}"  # a CPU smoke test sets GPT
# multi ARGS...: the bench under torchrun on GPUS GPUs (rank 0 prints the record: per-GPU tokens/s).
multi() {
  timeout 420 python3 -m torch.distributed.run --standalone --nproc_per_node="$GPUS" -m abi_train.bench "$@" \
    2>>"$OUT/log.txt" | tee -a "$OUT/scaling.jsonl"
}
CUDA_VISIBLE_DEVICES=0 bench $GPT | tee "$OUT/scaling.jsonl"
multi $GPT trainer.parallel=ddp
multi $GPT trainer.parallel=fsdp
python3 - "$OUT/scaling.jsonl" <<'EOF' | tee -a "$OUT/results.jsonl"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
one = next((r for r in rows if r["world_size"] == 1), None)
for r in rows:
    print(json.dumps({
        "parallel": r["parallel"], "gpus": r["world_size"], "card": r["card"], "torch": r["torch"],
        "batch_per_gpu": r["batch"], "seq_len": r["seq_len"], "step_ms": r["step_ms"],
        "tokens_per_s_per_gpu": r["tokens_per_s"], "tokens_per_s_job": r.get("tokens_per_s_job", r["tokens_per_s"]),
        "scaling_efficiency": round(r["tokens_per_s"] / one["tokens_per_s"], 4) if one else None,
        "mfu": r["mfu"], "peak_memory_gb": r["peak_memory_gb"],
    }))
EOF
tail -n 20 "$OUT/log.txt"
