# Multi-GPU levers on one host: GPT-2 124M weak scaling under DDP and FSDP2, and a Llama-3.2-1B shape fully
# fine-tuned under FSDP2, each against its one-process run in the same call.
# Device calls (carry .site .whl .ref, see scripts/gpu_env.sh; one section per call, each under 10 minutes):
#   NPROC=2 bash scripts/gpu_ddp.sh ddp|fsdp|1b|curve     kind nvidia-h200-x2 (NPROC=4 on nvidia-h200-x4)
#   NPROC=1 bash scripts/gpu_ddp.sh smoke                  one GPU: every command of the sections, a few steps
# Every run is one JSON line in $OUT/results.jsonl with "run" naming it and "nproc"; per-GPU tokens/s over the
# one-process tokens/s is the weak-scaling efficiency (batch 32 x 1024 per GPU, bf16, compiled).
# ddp also runs the tree before the loss all-reduce moved to log time when it is carried as .old
# (mkdir .old && git archive <commit> abi_train configs | tar -x -C .old; carry .old too).
source scripts/gpu_env.sh
NPROC="${NPROC:-$(nvidia-smi -L | wc -l)}"
SECTION="${1:-smoke}"
echo "section $SECTION nproc $NPROC" | tee -a "$OUT/env.txt"
[ "$NPROC" -gt 1 ] && nvidia-smi topo -m | tee -a "$OUT/env.txt"
GPT="recipe=llm model=gpt2-124m data.seq_len=1024 trainer.precision=bf16 trainer.compile=true trainer.batch_size=32"
GPT="$GPT data.cache_dir=/tmp/abi"
# Llama-3.2-1B shape, full fine-tuning (all parameters trained, AdamW), 8 x 2048 tokens per GPU.
B1="recipe=llm model=llama-1b data.seq_len=2048 trainer.precision=bf16 trainer.compile=true trainer.batch_size=8"
B1="$B1 data.cache_dir=/tmp/abi"
STEPS=()
if [ "$SECTION" = smoke ]; then
  STEPS=(bench.steps=5 bench.warmup=3)
fi
stamp() { echo "$(date +%T) $*" | tee -a "$OUT/times.txt"; }

# lever NAME NPROC ARGS...: abi_train.bench over NPROC processes (torchrun; 1: a plain process), its JSON line
# tagged with the run's name and process count.
lever() {
  local name=$1 n=$2
  shift 2
  local cmd=(python3 -m abi_train.bench)
  [ "$n" -gt 1 ] && cmd=(python3 -m torch.distributed.run --standalone --nproc_per_node="$n" -m abi_train.bench)
  stamp "$name"
  timeout "$BENCH_TIMEOUT" "${cmd[@]}" "$@" "${STEPS[@]}" 2>>"$OUT/log.txt" \
    | python3 -c 'import json, sys
for line in sys.stdin:
    if line.startswith("{"):
        print(json.dumps({"run": sys.argv[1], "nproc": int(sys.argv[2]), **json.loads(line)}))' "$name" "$n" \
    | tee -a "$OUT/results.jsonl"
}

# curve NAME NPROC ARGS...: a real run (python -m abi_train, 20 logged steps), its metrics kept as
# $OUT/metrics_NAME.jsonl: the loss curve of NPROC processes against one process on the same global batch.
curve() {
  local name=$1 n=$2
  shift 2
  local cmd=(python3 -m abi_train)
  [ "$n" -gt 1 ] && cmd=(python3 -m torch.distributed.run --standalone --nproc_per_node="$n" -m abi_train)
  stamp "curve $name"
  timeout "$BENCH_TIMEOUT" "${cmd[@]}" "$@" trainer.device=cuda trainer.log_every=1 trainer.eval_every=0 \
    trainer.ckpt_every=0 trainer.progress=false hydra.run.dir="/tmp/runs/$name" >>"$OUT/log.txt" 2>&1
  cp "/tmp/runs/$name/metrics.jsonl" "$OUT/metrics_$name.jsonl"
}

# The tokenizer cache is filled once, by one process, before ranks race for it.
case "$SECTION" in
smoke)  # one GPU: the commands below with WORLD_SIZE=1 (trainer.parallel resolves to none; the options are checked)
  lever gpt2 1 $GPT
  lever gpt2_ddp_options 1 $GPT trainer.ddp.bucket_cap_mb=100 trainer.ddp.static_graph=true
  lever gpt2_fsdp_options 1 $GPT trainer.parallel=fsdp trainer.fsdp.reshard_after_forward=false trainer.fsdp.prefetch=2
  lever llama1b 1 $B1 trainer.batch_size=2
  curve llama1b_smoke 1 $B1 trainer.batch_size=2 trainer.max_steps=3
  ;;
ddp)  # DDP levers one at a time (defaults: 25 MiB buckets, bucket views, no static graph, the DDP graph split)
  lever gpt2 1 $GPT
  lever ddp "$NPROC" $GPT trainer.parallel=ddp
  lever ddp_no_bucket_view "$NPROC" $GPT trainer.parallel=ddp trainer.ddp.gradient_as_bucket_view=false
  lever ddp_bucket_100mb "$NPROC" $GPT trainer.parallel=ddp trainer.ddp.bucket_cap_mb=100
  lever ddp_bucket_10mb "$NPROC" $GPT trainer.parallel=ddp trainer.ddp.bucket_cap_mb=10
  lever ddp_static_graph "$NPROC" $GPT trainer.parallel=ddp trainer.ddp.static_graph=true
  lever ddp_one_graph "$NPROC" $GPT trainer.parallel=ddp trainer.ddp.optimize=no_optimization
  # The loss all-reduce of every step, as before (the tree carried as .old has neither it moved nor trainer.ddp).
  [ -d .old ] && (cd .old && PYTHONPATH="$PWD/../.site:$PWD" lever ddp_step_allreduce "$NPROC" $GPT trainer.parallel=ddp)
  ;;
fsdp)  # FSDP2: ZeRO-3 (reshard after forward, the default) against ZeRO-2 style, with and without prefetching
  lever gpt2 1 $GPT
  lever fsdp "$NPROC" $GPT trainer.parallel=fsdp
  lever fsdp_zero2 "$NPROC" $GPT trainer.parallel=fsdp trainer.fsdp.reshard_after_forward=false
  lever fsdp_prefetch2 "$NPROC" $GPT trainer.parallel=fsdp trainer.fsdp.prefetch=2
  lever fsdp_zero2_prefetch2 "$NPROC" $GPT trainer.parallel=fsdp trainer.fsdp.reshard_after_forward=false \
    trainer.fsdp.prefetch=2
  ;;
1b)  # Llama-3.2-1B shape, full fine-tuning: tokens/s per GPU, MFU, peak memory per GPU
  lever llama1b 1 $B1
  lever llama1b_fsdp "$NPROC" $B1 trainer.parallel=fsdp
  lever llama1b_fsdp_zero2 "$NPROC" $B1 trainer.parallel=fsdp trainer.fsdp.reshard_after_forward=false
  lever llama1b_fsdp_prefetch2 "$NPROC" $B1 trainer.parallel=fsdp trainer.fsdp.prefetch=2
  ;;
curve)  # the same loss curve: one GPU accumulating NPROC micro-batches against NPROC GPUs under FSDP2
  global=$((8 * NPROC))
  curve llama1b_one 1 $B1 trainer.max_steps=20 trainer.global_batch_size=$global
  curve llama1b_fsdp "$NPROC" $B1 trainer.max_steps=20 trainer.global_batch_size=$global trainer.parallel=fsdp
  python3 - "$OUT" <<'EOF' | tee -a "$OUT/results.jsonl"
import json, sys
read = lambda name: [json.loads(l)["train/loss"] for l in open(f"{sys.argv[1]}/metrics_{name}.jsonl") if "train/loss" in l]
one, fsdp = read("llama1b_one"), read("llama1b_fsdp")
diff = max(abs(a - b) / abs(a) for a, b in zip(one, fsdp))
print(json.dumps({"run": "llama1b_curve", "steps": len(one), "one": one, "fsdp": fsdp, "max_rel_diff": round(diff, 5)}))
EOF
  ;;
*)
  echo "unknown section $SECTION; valid: smoke ddp fsdp 1b curve" >&2
  exit 2
  ;;
esac
grep -E "Error|error:" "$OUT/log.txt" | tail -n 20
