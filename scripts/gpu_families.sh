# This year's families on one H200 (docs/PERF.md, round 7): abi_train against transformers (+ peft) in the same call.
#   scripts/gpu_families.sh step   full fine-tuning and LoRA r16 steps of the Qwen3-0.6B and Gemma-3-1B shapes, seq 2048
#   scripts/gpu_families.sh sft    recipe=sft trainer.compile=true from an HF folder to model.gguf, timed, against eager;
#                                  needs SmolLM2's tokenizer.json (with its chat template) in .gl/smol_tok/
# Random weights (the step costs the same); bf16 autocast, compiled. Run with carry [".site", ".whl", ".gl"].
source scripts/gpu_env.sh
BENCH_TIMEOUT="${BENCH_TIMEOUT:-240}"
gpu="data.seq_len=2048 trainer.precision=bf16 trainer.compile=true bench.steps=15 bench.warmup=5 data.cache_dir=/tmp/abi"
case "${1:-step}" in
  step)
    for shape in qwen3-0.6b gemma3-1b; do
      bench recipe=llm model=$shape trainer.batch_size=4 $gpu
      ref hf-family --shape $shape --batch 4 --steps 15 --warmup 5
      bench recipe=llm model=$shape adapter=lora trainer.batch_size=4 $gpu
      ref hf-family --shape $shape --lora 16 --batch 4 --steps 15 --warmup 5
    done
    ;;
  sft)  # a SmolLM2-shaped HF folder (random weights, SmolLM2's tokenizer), then the persona SFT default from it
    python3 - <<'PY'
import shutil, transformers
c = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=1e5,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
transformers.LlamaForCausalLM(c).save_pretrained("/tmp/smol")
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f".gl/smol_tok/{f}", "/tmp/smol")
PY
    for compile in ${SFT_COMPILE:-true false}; do
      start=$SECONDS
      timeout 540 python3 -m abi_train recipe=sft init_from=/tmp/smol trainer.device=cuda trainer.compile=$compile \
        trainer.precision=bf16 hydra.run.dir=/tmp/sft_$compile >"$OUT/sft_$compile.log" 2>&1
      echo "{\"sft_compile\": $compile, \"rc\": $?, \"wall_s\": $((SECONDS - start))}" | tee -a "$OUT/results.jsonl"
      grep -E "step 0:|step 24:|exported" "$OUT/sft_$compile.log" | tail -4
    done
    ;;
esac
