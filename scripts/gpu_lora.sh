# LoRA and full fine-tuning steps, abi_train against transformers + peft in the same call (docs/PERF.md, round 6).
#   scripts/gpu_lora.sh small   LoRA r16 on the SmolLM2-135M shape, seq 2048; then LoRA r16 on the Llama-3.2-1B shape
#   scripts/gpu_lora.sh full    full fine-tuning of the Llama-3.2-1B shape, seq 2048
#   scripts/gpu_lora.sh sft     the SFT step (LoRA, SmolLM2-135M shape, seq 2048): packed rows against length-bucketed
#                               padding, and a kernel profile of the LoRA LM step; needs SmolLM2's tokenizer.json
#                               (with its chat template) in .gl/smol_tok/ (carry ".gl" too)
# Random weights (the step costs the same); bf16 autocast, compiled (transformers + peft also eager, in case
# compile does not pay for it). Run with carry [".site", ".whl", ".ref"].
source scripts/gpu_env.sh
BENCH_TIMEOUT="${BENCH_TIMEOUT:-170}"
gpu="data.seq_len=2048 trainer.precision=bf16 trainer.compile=true trainer.bf16_residual=true bench.steps=15 bench.warmup=5"
common="$gpu data.cache_dir=/tmp/abi"
case "${1:-small}" in
  small)  # LoRA r16 on both shapes
    bench recipe=llm model=llama-135m adapter=lora trainer.batch_size=8 $common
    ref hf-llama --shape llama-135m --lora 16 --batch 8 --steps 15 --warmup 5
    ref hf-llama --shape llama-135m --lora 16 --batch 8 --steps 15 --warmup 3 --eager
    bench recipe=llm model=llama-1b adapter=lora trainer.batch_size=4 $common
    ref hf-llama --shape llama-1b --lora 16 --batch 4 --steps 15 --warmup 5
    ;;
  full)  # what the first call's 140 s limit cut (1B LoRA, compiled transformers 135M), then 1B full fine-tuning
    bench recipe=llm model=llama-1b adapter=lora trainer.batch_size=4 $common
    bench recipe=llm model=llama-1b trainer.batch_size=4 $common
    ref hf-llama --shape llama-1b --batch 4 --steps 15 --warmup 5
    ref hf-llama --shape llama-135m --lora 16 --batch 8 --steps 15 --warmup 5
    ;;
  sft)
    sft="recipe=sft init_from=null model=llama-135m data.tokenizer=.gl/smol_tok/tokenizer.json adapter=lora \
      trainer.batch_size=8 $gpu"
    bench $sft data.packing=true
    bench $sft data.packing=false
    bench recipe=llm model=llama-135m adapter=lora trainer.batch_size=8 $common bench.profile="$OUT/lora_135m_profile.txt"
    ;;
  stacked)  # LoRA with q/k/v's A's stacked and B's block-diagonal (2 matmuls, not 6), and CUDA graphs on top
    bench recipe=llm model=llama-135m adapter=lora trainer.batch_size=8 $common
    bench recipe=llm model=llama-135m adapter=lora trainer.batch_size=8 $common bench.compile_mode=reduce-overhead
    bench recipe=llm model=llama-1b adapter=lora trainer.batch_size=4 $common
    ;;
esac
