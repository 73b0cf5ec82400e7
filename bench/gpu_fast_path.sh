#!/usr/bin/env bash
# The compiled fast path on a lent GPU, in one device call, without Ray: efficiency per strategy, eager and
# compiled (run.compile: static KV cache, one CUDA graph per forward shape), on the zoo (float32, exact) and on
# random weights in SmolLM2-135M's shape (bfloat16, tie-aware check), with the launch/bandwidth floor; and the
# CUDA-graph test of tests/test_static_lm.py.
#
# Carried (an ignored folder, so that it travels with `carry`): build/gpu-carry/
#   wheels/transformers-*.whl    the transformers this repository is tested with
#   zoo/target, zoo/draft-1l     the embedded zoo's target and 1-layer draft (SPECSWEEP_HOME/zoo/<key>/)
#   head/                        the zoo target's EAGLE head (SPECSWEEP_HOME/artifacts/eagle/<key>/)
#
#   bash bench/gpu_fast_path.sh OUT_DIR [full|final]
# full: every row, eager, compiled and transformers' compiled generate() (about 6 minutes on an H200);
# final: the GPU test, then the compiled rows of speculative and eagle with their eager peers, then the
# SmolLM2-shaped baseline and floor (about 4 minutes). Writes env.txt, *.txt and *.json into OUT_DIR.
set -uo pipefail
out=${1:?output directory}
what=${2:-full}
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
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
zoo=(python3 bench/efficiency.py --zoo "$carry/zoo" --head "$carry/head" --floor --prompts 3 --new-tokens 96)
shape=(python3 bench/efficiency.py --shape smollm2 --dtype bfloat16 --floor --gammas 3 --new-tokens 96)
if [ "$what" = full ]; then
    timeout 170 "${zoo[@]}" --repeats 2 --out "$out/zoo.json" > "$out/zoo.txt" 2>&1
    echo "zoo exit $?"
    timeout 230 "${shape[@]}" --prompts 2 --repeats 2 --out "$out/smollm2.json" > "$out/smollm2.txt" 2>&1
    echo "smollm2 exit $?"
else
    timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_static_lm.py -k cuda_graph > "$out/pytest.txt" 2>&1
    echo "pytest exit $?"; tail -3 "$out/pytest.txt"
    timeout 100 "${zoo[@]}" --repeats 3 --modes eager compiled --rows "^(speculative|eagle γ|hf_assisted)" \
        --out "$out/zoo.json" > "$out/zoo.txt" 2>&1
    echo "zoo exit $?"
    timeout 60 "${shape[@]}" --prompts 2 --repeats 3 --modes compiled --rows "^$" --out "$out/smollm2.json" \
        > "$out/smollm2.txt" 2>&1
    echo "smollm2 exit $?"
fi
for f in "$out"/zoo.txt "$out"/smollm2.txt; do grep -v '^W\|warn' "$f" | cut -c1-250 | tail -14; done
