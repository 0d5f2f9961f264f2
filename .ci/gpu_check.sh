#!/usr/bin/env bash
# The one prepared GPU check, for a session lent a CUDA machine (device tool), ~10 minutes:
#   1. kernel correctness on CUDA and the kernel benchmark table (pagedserve bench kernels),
#   2. the engine end to end on CUDA: greedy parity of the Triton path with the torch path,
#   3. the quantized linear layers' Triton dequantize-GEMM: error and time against a dense
#      F.linear, and a GPTQ act-order model's greedy tokens against its float copy,
#   4. a serving benchmark on CUDA (SmolLM2-135M-shaped random model, bf16).
# Results land in ${OUT:-gpu-results}/ (kernels.json, kernels.txt, e2e.txt, quant.txt,
# serve-cN.json).
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

echo "== 3. quantized linear layers on CUDA (Triton dequantize-GEMM)"
timeout 240 python - "$(mktemp -d)" <<'PY' 2>&1 | tee "$OUT/quant.txt"
import sys, torch
from pathlib import Path
import torch.nn.functional as F
from pagedserve_kernels import ops, reference
from server import LLM, SamplingParams
from tests.model_factory import make_tiny_model
from tests.packed_int_factory import write_packed

def ms(fn, iters=50):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / iters

torch.manual_seed(0)
print("dtype bits N K M rel_err block_ms dense_ms dense/block")
for dtype in (torch.float16, torch.bfloat16):
    for n, k in ((1536, 576), (576, 1536)):
        for bits in (4, 8):
            q = torch.randint(0, 16, (n, k)) if bits == 4 else torch.randint(-127, 128, (n, k))
            values = (ops.pack_nibbles(q) if bits == 4 else q.to(torch.int8)).cuda()
            scales = (torch.rand(n, k // 32) * 0.01).half().cuda()
            mins = (torch.randn(n, k // 32) * 0.01).half().cuda()
            dense = reference.linear_blocks(torch.eye(k).cuda(), values, scales, mins).t()
            dense = dense.to(dtype).contiguous()
            for m in (1, 16, 64, 512):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                out = ops.linear_blocks(x, values, scales, mins)
                ref = reference.linear_blocks(x.float(), values, scales, mins)
                err = float((out.float() - ref).norm() / ref.norm())
                a = ms(lambda: ops.linear_blocks(x, values, scales, mins))
                b = ms(lambda: F.linear(x, dense))
                print(f"{str(dtype)[6:]} {bits} {n} {k} {m} {err:.2e} {a:.4f} {b:.4f} {b / a:.2f}")
root = Path(sys.argv[1])
packed, floats = write_packed(make_tiny_model(root / "llama", "llama", rope_scaling=None), root,
                              group_size=32, sym=True, act_order=True)
params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
prompts = [[5, 17, 300, 41], list(range(20, 60))]
tokens = [[o.outputs[0].token_ids for o in LLM(str(path), device="cuda", dtype="float32",
           kv_cache_memory=1 << 26).generate(prompts, params)] for path in (packed, floats)]
print("GPTQ act-order model on CUDA vs its float copy, fp32 greedy:",
      "identical" if tokens[0] == tokens[1] else f"DIFFERENT {tokens}")
PY

echo "== 4. serving on CUDA"
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
