#!/usr/bin/env bash
# The one prepared GPU check, for a session lent a CUDA machine (device tool), ~10 minutes:
#   1. kernel correctness on CUDA and the kernel benchmark table (pagedserve bench kernels),
#   2. the engine end to end on CUDA: greedy parity of the Triton path with the torch path,
#   3. a serving benchmark on CUDA (SmolLM2-135M-shaped random model, bf16).
# Results land in ${OUT:-gpu-results}/ (kernels.json, kernels.txt, e2e.txt, serve-cN.json).
# Usage there: bash .ci/gpu_check.sh. Needs torch with CUDA, triton, and the project's other
# dependencies (transformers, tokenizers, safetensors, fastapi, uvicorn, pydantic,
# prometheus_client, httpx, tqdm); that machine reaches no index, so missing ones travel as
# wheels (see the device tool's README) and are installed before this script runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"

echo "== 1. kernels"
timeout 300 python -m server bench kernels --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"

echo "== 2. engine end to end on CUDA (Triton vs torch attention, greedy)"
MODEL=$(mktemp -d)/smollm2
python -m server bench make-model --preset smollm2-135m --out "$MODEL" --dtype bfloat16
timeout 300 python - "$MODEL" <<'PY' 2>&1 | tee "$OUT/e2e.txt"
import sys, random
from server import LLM, SamplingParams
rng = random.Random(0)
prompts = [[rng.randrange(3, 49152) for _ in range(rng.randrange(5, 300))] for _ in range(16)]
params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
outs = {}
for backend in ("triton", "torch"):
    llm = LLM(sys.argv[1], device="cuda", attention_backend=backend, kv_cache_memory=2 << 30)
    outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    del llm
same = sum(a == b for a, b in zip(outs["triton"], outs["torch"]))
print(f"triton vs torch greedy: {same}/{len(prompts)} identical (bf16: rare divergence after "
      "near-ties is expected; fp32 should be 16/16)")
PY

echo "== 3. serving on CUDA"
python -m server serve "$MODEL" --device cuda --port 8123 --max-model-len 2048 --log-level warning \
  > "$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 120); do curl -sf localhost:8123/health >/dev/null && break; sleep 1; done
for c in 1 32 128; do
  timeout 150 python -m server bench serve --base-url http://127.0.0.1:8123/v1 --model smollm2 \
    --num-prompts $((c < 8 ? 8 : c * 2)) --concurrency "$c" --input-len 128 --output-len 128 \
    --vocab-size 49152 --ignore-eos --json "$OUT/serve-c$c.json" 2>&1 | tail -12
done
kill "$SERVER"; wait "$SERVER" 2>/dev/null
echo "done: $OUT"
