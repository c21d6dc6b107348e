# Issue 7 levers, one at a time, each reference re-run in the same call.
# Device call: bash scripts/gpu_levers.sh vision|llm|autotune|loader [prefetch-only]|nobias|tune|uint8 [float32-only]   (carry .site .whl .ref; see scripts/gpu_env.sh).
# Results: docs/PERF.md.
source scripts/gpu_env.sh
VIT_SHAPE="recipe=vit model=vit-b16 model.drop_path=0.0 trainer.batch_size=256 trainer.precision=bf16 trainer.compile=true"
CLIP_SHAPE="recipe=clip model=clip-b32 trainer.batch_size=512 trainer.precision=bf16 trainer.compile=true"
VIT="$VIT_SHAPE trainer.num_workers=0"
CLIP="$CLIP_SHAPE trainer.num_workers=0"
GPT="recipe=llm model=gpt2-124m data.seq_len=1024 trainer.batch_size=32 trainer.precision=bf16 data.cache_dir=/tmp/abi trainer.compile=true"
LOWP="trainer.bf16_residual=true"
stamp() { echo "$(date +%T) $*" | tee -a "$OUT/times.txt"; }
# Real runs (python -m abi_train itself, its DataLoader workers drawing the generated 224 px data)
REAL="$LOWP trainer.device=cuda trainer.log_every=20 trainer.eval_every=0 trainer.ckpt_every=0 trainer.progress=false
  trainer.num_workers=14"
RUN="$VIT_SHAPE $REAL trainer.max_steps=100 data.num_train=30000"
CRUN="$CLIP_SHAPE $REAL trainer.max_steps=60 data.num_train=35000"
real() {  # real NAME ARGS...: one run, its metrics.jsonl kept as $OUT/metrics_NAME.jsonl
  local name=$1; shift
  stamp "$name"; timeout 280 python3 -m abi_train "$@" hydra.run.dir=/tmp/runs/$name >>"$OUT/log.txt" 2>&1
  cp /tmp/runs/$name/metrics.jsonl "$OUT/metrics_$name.jsonl"
}
case "$1" in
vision)
  stamp start; ref timm-vit --batch 256
  stamp; bench $VIT
  stamp; bench $VIT $LOWP bench.profile="$OUT/profile_vit_lowp.txt"
  stamp; bench $VIT $LOWP trainer.attention=flash
  stamp; bench $VIT $LOWP bench.compile_mode=reduce-overhead
  stamp; ref open-clip --batch 512
  stamp; bench $CLIP
  stamp; bench $CLIP $LOWP bench.profile="$OUT/profile_clip_lowp.txt"
  stamp; bench $CLIP trainer.attention=flash
  stamp; bench $CLIP bench.compile_mode=reduce-overhead
  ;;
llm)
  stamp start; ref nanogpt --batch 32
  stamp; bench $GPT
  stamp; bench $GPT $LOWP bench.profile="$OUT/profile_gpt_lowp.txt"
  stamp; bench $GPT trainer.attention=flash
  stamp; bench $GPT $LOWP bench.compile_mode=reduce-overhead
  ;;
nobias)  # GPT-2 at the reference shape (no biases, as nanoGPT's default)
  stamp start; ref nanogpt --batch 32
  stamp; bench $GPT model.bias=false
  stamp; bench $GPT model.bias=false $LOWP
  ;;
autotune)  # Triton matmul templates can take the bias + GELU epilogue that cuBLAS leaves to a separate kernel
  AT="bench.compile_mode=max-autotune-no-cudagraphs"
  stamp start; bench $VIT $LOWP $AT bench.profile="$OUT/profile_vit_autotune.txt"
  stamp; bench $CLIP $LOWP $AT
  stamp; bench $GPT $LOWP $AT
  ;;
loader)  # real runs (DataLoader workers drawing 224 px images), the next batch prefetched to the GPU or not
  RUNS=("vit $RUN" "vit_noprefetch $RUN trainer.prefetch=false" "clip $CRUN" "clip_noprefetch $CRUN trainer.prefetch=false")
  [ "$2" = "prefetch-only" ] && RUNS=("vit $RUN" "clip $CRUN")  # after the faster image generator
  for run in "${RUNS[@]}"; do real $run; done
  ;;
uint8)  # real ViT runs: float32 images from the workers (the tree before, carried as .old) vs uint8 (normalised on the GPU)
  # .old: mkdir .old && git archive 7aa05f8 abi_train configs recipes | tar -x -C .old   (carry .old too)
  (cd .old && real vit_float32 $RUN)
  [ "$2" = "float32-only" ] || real vit_uint8 $RUN  # the uint8 run of the first call is in PERF.md
  ;;
tune)  # Inductor's coordinate-descent tuning of its own (pointwise, norm, reduction) kernels' block sizes
  python3 -c 'import sys, torch, torch.nn.attention as a, torch._inductor.config as c; print(sys.version.split()[0], "cudnn", torch.backends.cudnn.version(), "mix_order_reduction", c.triton.mix_order_reduction, "flash impls", getattr(a, "list_flash_attention_impls", lambda: "n/a")())' | tee -a "$OUT/env.txt"
  stamp start; ref timm-vit --batch 256
  stamp; bench $VIT $LOWP
  stamp; TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 bench $VIT $LOWP
  stamp; ref nanogpt --batch 32
  stamp; bench $GPT model.bias=false $LOWP
  stamp; TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 bench $GPT model.bias=false $LOWP
  ;;
*) echo "usage: bash scripts/gpu_levers.sh vision|llm|autotune|loader [prefetch-only]|nobias|tune|uint8 [float32-only]" >&2; exit 2 ;;
esac
stamp end
grep -E "Error|error:" "$OUT/log.txt" | tail -n 20
