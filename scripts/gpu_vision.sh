# ViT-B/16 (timm vit_base_patch16_224, batch 256) and CLIP ViT-B/32 (open_clip ViT-B-32 + ClipLoss, batch 512)
# against abi_train's vit and clip recipes, same call, same card; bf16; compiled, then eager.
# Device call: bash scripts/gpu_vision.sh   (carry .site .whl .ref; see scripts/gpu_env.sh). Results: docs/PERF.md.
source scripts/gpu_env.sh
VIT="recipe=vit model=vit-b16 model.drop_path=0.0 trainer.batch_size=256 trainer.precision=bf16 trainer.num_workers=0"
CLIP="recipe=clip model=clip-b32 trainer.batch_size=512 trainer.precision=bf16 trainer.num_workers=0"
ref timm-vit --batch 256
bench $VIT trainer.compile=true bench.profile="$OUT/profile_vit.txt"
ref open-clip --batch 512
bench $CLIP trainer.compile=true bench.profile="$OUT/profile_clip.txt"
ref timm-vit --batch 256 --eager
bench $VIT trainer.compile=false
ref open-clip --batch 512 --eager
bench $CLIP trainer.compile=false
grep -E "Error|error:" "$OUT/log.txt" | tail -n 20
