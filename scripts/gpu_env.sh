# Sourced at the start of every device call (scripts/gpu_*.sh): the GPU machine has torch, timm and triton but
# not hydra/omegaconf/antlr4 (carried as .site/, pure Python, copied from a local venv) nor open_clip (carried
# as wheels in .whl/). Run with carry: [".site", ".whl", ".ref"].
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-/tmp/out}" TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee -a "$OUT/env.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' \
  | tee -a "$OUT/env.txt"

# bench ARGS...: one abi_train.bench run (its JSON line goes to $OUT/results.jsonl), BENCH_TIMEOUT s at most.
BENCH_TIMEOUT="${BENCH_TIMEOUT:-300}"
bench() { timeout "$BENCH_TIMEOUT" python3 -m abi_train.bench "$@" 2>>"$OUT/log.txt" | tee -a "$OUT/results.jsonl"; }
# ref ARGS...: one reference run (scripts/gpu_reference.py), same output.
ref() { timeout "$BENCH_TIMEOUT" python3 scripts/gpu_reference.py "$@" 2>>"$OUT/log.txt" | tee -a "$OUT/results.jsonl"; }
