# Round 5 device call (docs/PERF.md): the CPU step at nanoGPT's CPU shape on the GPU machine's quiet CPU
# (2 threads; fused AdamW and, pricing the change, the earlier unfused one), then the one-GPU reference of the
# Llama-3.2-1B shape fully fine-tuned (what scripts/gpu_ddp.sh 1b compares FSDP2 against).
# Run with carry [".site", ".whl", ".ref"].
source scripts/gpu_env.sh
for i in 1 2; do
  for flag in "" --unfused-adamw; do
    OMP_NUM_THREADS=2 CUDA_VISIBLE_DEVICES="" timeout 100 python3 scripts/cpu_step.py --steps 200 $flag \
      2>>"$OUT/log.txt" | tail -1 | tee -a "$OUT/cpu_step.jsonl"
  done
done
bench recipe=llm model=llama-1b data.seq_len=2048 trainer.precision=bf16 trainer.compile=true trainer.batch_size=8 \
  trainer.bf16_residual=true data.cache_dir=/tmp/abi bench.steps=20 bench.warmup=5
