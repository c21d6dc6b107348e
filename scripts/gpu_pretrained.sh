# Device call for the pretrained-weights work (issue 13) and the CPU step (issue 16), one call:
#   1. timm and open_clip, installed on the GPU machine, checked against abi_train's import of their folders;
#   2. the CPU step at nanoGPT's CPU shape beside nanoGPT's (2 threads of the machine's quiet CPU);
#   3. the GPU bench of GPT-2 124M beside nanoGPT after the trainer reshape (no regression expected).
# Run with carry [".site", ".whl", ".ref"] (see scripts/gpu_env.sh). Results: docs/PERF.md, README.
source scripts/gpu_env.sh
stamp() { echo "$(date +%T) $*" | tee -a "$OUT/times.txt"; }
stamp timm-open-clip
timeout 240 python3 scripts/check_timm_open_clip.py --require 2>>"$OUT/log.txt" | tee "$OUT/timm_open_clip.jsonl"
stamp cpu-step
timeout 200 bash scripts/cpu_step.sh 3
stamp gpu-bench
GPT="recipe=llm model=gpt2-124m model.bias=false data.seq_len=1024 trainer.batch_size=32 trainer.precision=bf16
  trainer.compile=true trainer.bf16_residual=true data.cache_dir=/tmp/abi"
ref nanogpt --batch 32
bench $GPT
stamp end
