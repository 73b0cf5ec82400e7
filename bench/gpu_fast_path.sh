#!/usr/bin/env bash
# The compiled fast path on a lent GPU, in one device call, without Ray: efficiency per strategy, eager and
# compiled (run.compile: static KV cache, one CUDA graph per forward width), on the zoo (float32, exact) and on
# random weights in SmolLM2-135M's shape (bfloat16, tie-aware check), with the launch/bandwidth floor.
#
# Carried (an ignored folder, so that it travels with `carry`): build/gpu-carry/
#   wheels/transformers-*.whl    the transformers this repository is tested with
#   zoo/target, zoo/draft-1l     the embedded zoo's target and 1-layer draft (SPECSWEEP_HOME/zoo/<key>/)
#   head/                        the zoo target's EAGLE head (SPECSWEEP_HOME/artifacts/eagle/<key>/)
#
#   bash bench/gpu_fast_path.sh "$OUT"      # writes env.txt, zoo.{txt,json}, smollm2.{txt,json} there
set -uo pipefail
out=${1:?output directory}
carry=build/gpu-carry
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$carry"/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SPECSWEEP_HOME=/tmp/specsweep-home
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import sys, torch, transformers
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'transformers', transformers.__version__)"
    echo "cpus $(nproc)"
    git log -1 --format='commit %h %s' 2>/dev/null || true
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
timeout "${ZOO_TIMEOUT:-170}" python3 bench/efficiency.py --zoo "$carry/zoo" --head "$carry/head" --floor \
    --prompts 3 --new-tokens 96 --repeats 2 --out "$out/zoo.json" 2>&1 | grep -v "Loading weights" > "$out/zoo.txt"
echo "zoo exit ${PIPESTATUS[0]}"; tail -5 "$out/zoo.txt"
timeout "${SHAPE_TIMEOUT:-230}" python3 bench/efficiency.py --shape smollm2 --dtype bfloat16 --floor --gammas 3 \
    --prompts 2 --new-tokens 96 --repeats 2 --out "$out/smollm2.json" > "$out/smollm2.txt" 2>&1
echo "smollm2 exit ${PIPESTATUS[0]}"; tail -5 "$out/smollm2.txt"
