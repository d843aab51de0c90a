#!/usr/bin/env bash
# Check a GPU machine in one go (at most about 8 minutes): the GPU, driver, torch and CUDA versions,
# the CUDA tests (tests/test_cuda.py), then benchmark.py on the table's Cityscapes 512x1024 rows,
# R-50-D8 with every variant (torch.compile included) and R-101-D8 without the compile variant.
#
#     bash tools/check_gpu.sh                  # every step
#     bash tools/check_gpu.sh tests r101       # only these steps: versions tests r50 r101
#
# Each step's output goes to the screen and to $OUT/<step>.log (./gpu_check_out without $OUT), the
# benchmarks' JSON to $OUT/benchmark_<row>.json, one line per step with its exit status and time to
# $OUT/summary.log. Each step has its own time limit (seconds; set e.g. TESTS_TIMEOUT=300 to change
# one); a step that fails or runs out of time does not stop the next. Exit status 0 when all passed.

set -u -o pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0

run_step() {  # run_step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*" | tee -a "$out/summary.log"
    local start=$SECONDS
    # timeout signals the whole process group, so torchrun's and the tests' children stop too.
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local status=${PIPESTATUS[0]}
    local note=""
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        note=" (ran out of time)"
    fi
    echo "=== $name: exit $status$note after $((SECONDS - start)) s" | tee -a "$out/summary.log"
    if [ "$status" -ne 0 ]; then
        failed=1
    fi
}

versions() {
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_mode --format=csv
    python - <<'EOF'
import platform

import torch

print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    print(f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        print(f"cuda:{index} {properties.name}, compute capability {properties.major}.{properties.minor}, "
              f"{properties.total_memory / 1024**3:.1f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
else:
    print("torch sees no CUDA device")
EOF
}

steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then
    steps=(versions tests r50 r101)
fi
echo "=== $(date -u +%FT%TZ) check_gpu.sh ${steps[*]} at $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
    | tee -a "$out/summary.log"
for step in "${steps[@]}"; do
    case $step in
        versions) run_step versions "${VERSIONS_TIMEOUT:-30}" bash -c "$(declare -f versions); versions" ;;
        tests) run_step tests "${TESTS_TIMEOUT:-200}" python -m pytest -q -rs tests/test_cuda.py ;;
        r50)
            run_step benchmark_r50 "${R50_TIMEOUT:-170}" python benchmark.py --dataset cityscapes --crop 512x1024 \
                --iters 20 --data-iters 10 --out "$out/benchmark_r50.json"
            ;;
        r101)
            # The data pipeline does not depend on the depth (r50 times it); no compile, to fit the time.
            run_step benchmark_r101 "${R101_TIMEOUT:-90}" python benchmark.py --dataset cityscapes --crop 512x1024 \
                --depth 101 --iters 20 --data-iters 2 --no-compile --out "$out/benchmark_r101.json"
            ;;
        *)
            echo "unknown step $step: choose from versions tests r50 r101" | tee -a "$out/summary.log"
            failed=1
            ;;
    esac
done
exit $failed
