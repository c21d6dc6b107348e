# GPT-2 124M on one GPU: nanoGPT (the reference) and abi_train in the same call, same card.
# Device call: bash scripts/gpu_llm.sh   (carry .site .whl .ref; see scripts/gpu_env.sh). Results: docs/PERF.md.
source scripts/gpu_env.sh
GPT="recipe=llm model=gpt2-124m data.seq_len=1024 trainer.precision=bf16 data.cache_dir=/tmp/abi"
ref nanogpt --batch 32
ref nanogpt --batch 32 --bias
bench $GPT trainer.compile=true trainer.batch_size=32
bench $GPT trainer.compile=true trainer.batch_size=32 trainer.attention=flash
ref nanogpt --batch 16
bench $GPT trainer.compile=true trainer.batch_size=16
ref nanogpt --batch 16 --eager
bench $GPT trainer.compile=false trainer.batch_size=16
grep -E "Error|error:" "$OUT/log.txt" | tail -n 20
