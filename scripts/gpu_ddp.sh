# GPT-2 124M weak scaling on one 2-GPU host: one process, then DDP and FSDP2 over 2 processes (torchrun),
# batch 32 x 1024 tokens per GPU, bf16, compiled. Device call (kind nvidia-h100-x2): bash scripts/gpu_ddp.sh
# (carry .site .whl .ref). Per-GPU tokens/s over the one-process tokens/s is the weak-scaling efficiency.
source scripts/gpu_env.sh
nvidia-smi topo -m | tee -a "$OUT/env.txt"
GPT="recipe=llm model=gpt2-124m data.seq_len=1024 trainer.precision=bf16 trainer.compile=true trainer.batch_size=32"
GPT="$GPT data.cache_dir=/tmp/abi"
# The tokenizer cache is filled once, before two ranks race for it.
bench $GPT bench.steps=30
for parallel in ddp fsdp; do
  timeout 300 python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m abi_train.bench $GPT \
    trainer.parallel=$parallel 2>>"$OUT/log.txt" | tee -a "$OUT/results.jsonl"
done
grep -E "Error|error:" "$OUT/log.txt" | tail -n 20
