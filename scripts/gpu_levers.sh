# Issue 7 levers, one at a time, for ViT-B/16 and CLIP ViT-B/32, each reference re-run in the same call.
# Device call: bash scripts/gpu_levers.sh   (carry .site .whl .ref; see scripts/gpu_env.sh). Results: docs/PERF.md.
source scripts/gpu_env.sh
VIT="recipe=vit model=vit-b16 model.drop_path=0.0 trainer.batch_size=256 trainer.precision=bf16 trainer.num_workers=0 trainer.compile=true"
CLIP="recipe=clip model=clip-b32 trainer.batch_size=512 trainer.precision=bf16 trainer.num_workers=0 trainer.compile=true"
stamp() { echo "$(date +%T) $*" | tee -a "$OUT/times.txt"; }
stamp start; ref open-clip --batch 512
stamp; bench $CLIP
stamp; bench $CLIP trainer.attention=math bench.profile="$OUT/profile_clip_math.txt"
stamp; bench $CLIP trainer.attention=math trainer.bf16_residual=true
stamp; bench $CLIP trainer.attention=flash
stamp; ref timm-vit --batch 256
stamp; bench $VIT
stamp; bench $VIT trainer.attention=flash
stamp; bench $VIT trainer.attention=math
stamp; bench $VIT trainer.attention=efficient
stamp; bench $VIT trainer.bf16_residual=true
stamp; bench $CLIP trainer.attention=efficient
stamp end
grep -E "Error|error:" "$OUT/log.txt" | tail -n 20
