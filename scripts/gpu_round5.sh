# Round 5 device call (docs/PERF.md): the CPU step at nanoGPT's CPU shape on the GPU machine's quiet CPU
# (2 threads; fused AdamW and, pricing the change, the earlier unfused one), then one-GPU checks of the
# multi-GPU code (scripts/gpu_ddp.sh with NPROC=1). Run with carry [".site", ".whl", ".ref"].
source scripts/gpu_env.sh
for i in 1 2 3; do
  OMP_NUM_THREADS=2 CUDA_VISIBLE_DEVICES="" timeout 120 python3 scripts/cpu_step.py --steps 200 2>>"$OUT/log.txt" \
    | tail -1 | tee -a "$OUT/cpu_step.jsonl"
  OMP_NUM_THREADS=2 CUDA_VISIBLE_DEVICES="" timeout 120 python3 scripts/cpu_step.py --steps 200 --unfused-adamw \
    2>>"$OUT/log.txt" | tail -1 | tee -a "$OUT/cpu_step.jsonl"
done
