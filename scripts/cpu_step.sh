# The CPU training step at nanoGPT's own CPU shape (4 layers, 4 heads, 128 wide, block 64, batch 12,
# vocab 2048, fp32, no compile, 2 threads), abi_train's bench beside nanoGPT's step, alternated ROUNDS times
# so both see the same machine; then one profile of each (CPU op table).
#   bash scripts/cpu_step.sh [ROUNDS]      (nanoGPT's model.py at .ref/nanogpt_model.py; see gpu_reference.py)
# Results: $OUT/cpu_step.jsonl, $OUT/profile_cpu_*.txt; docs/PERF.md "CPU step".
source scripts/gpu_env.sh
export OMP_NUM_THREADS=2 CUDA_VISIBLE_DEVICES=""
ROUNDS="${1:-3}"
ABI="recipe=llm model=gpt2-tiny model.n_layer=4 model.n_head=4 model.d_model=128 model.context_length=64
  model.vocab_size=2048 model.bias=false data.seq_len=64 data.cache_dir=/tmp/abi trainer.batch_size=12
  trainer.device=cpu trainer.precision=fp32 trainer.grad_clip=1.0 optim.weight_decay=0.1 bench.steps=50 bench.warmup=10"
NANO="nanogpt --shape cpu --batch 12 --device cpu --precision fp32 --eager --threads 2 --steps 50 --warmup 10"
for round in $(seq "$ROUNDS"); do
  python3 -m abi_train.bench $ABI 2>>"$OUT/log.txt" | tee -a "$OUT/cpu_step.jsonl"
  python3 scripts/gpu_reference.py $NANO 2>>"$OUT/log.txt" | tee -a "$OUT/cpu_step.jsonl"
done
python3 -m abi_train.bench $ABI bench.profile="$OUT/profile_cpu_abi.txt" 2>>"$OUT/log.txt" >/dev/null
python3 scripts/gpu_reference.py $NANO --profile "$OUT/profile_cpu_nanogpt.txt" 2>>"$OUT/log.txt" >/dev/null
