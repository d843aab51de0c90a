#!/usr/bin/env bash
# Check a GPU machine in one go (about 8 minutes on one H200): the GPU, driver, torch and CUDA versions,
# the CUDA tests (tests/test_cuda.py), benchmark.py and its targets (targets.py) on the table's Cityscapes
# 512x1024 rows (R-50-D8 with the top kernels, R-101-D8), the loader's training samples per second with
# 8 and 15 workers, and train.py itself for 300 iterations at batch 8 on a synthetic Cityscapes, with the
# projected time of the 40k-iteration R-50-D8 row. torch.compile is a step of its own (r50compile, about
# 5 minutes more): compiling the training step took over 100 s on an H200. So are train.py --compile,
# with its own projection (traincompile, limit 330 s), and the NonLocal model of the R-50-D8 row
# (nonlocal, the paper's comparison in bf16, limit 150 s); neither has run on a GPU yet.
#
#     bash tools/gpu_check/check_gpu.sh                    # versions tests r50 r101 loader train
#     bash tools/gpu_check/check_gpu.sh tests r50compile   # only these steps
#     bash tools/gpu_check/check_gpu.sh versions tests r50 r101 train traincompile nonlocal
#
# Each step's output goes to the screen and to $OUT/<step>.log (./gpu_check_out without $OUT), the
# benchmarks' JSON to $OUT/benchmark_<row>.json, one line per step with its exit status and time to
# $OUT/summary.log, and at the end a digest of the figures. Each step has its own time limit (seconds;
# set e.g. TESTS_TIMEOUT=300 to change one); a step that fails or runs out of time does not stop the
# next. PYTHON picks the interpreter (default python3). Exit status 0 when all passed.

set -u -o pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
scratch="$(mktemp -d)"  # the synthetic Cityscapes and the training run's work dir
trap 'rm -rf "$scratch"' EXIT
failed=0

run_step() {  # run_step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local command="$*"
    [ ${#command} -gt 160 ] && command="${command:0:160}..."
    echo "=== $name (limit ${limit} s): $command" | tee -a "$out/summary.log"
    local start=$SECONDS
    # timeout signals the whole process group, so torchrun's and the tests' children stop too.
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local status=${PIPESTATUS[0]}
    local note=""
    case $status in 124 | 137) note=" (ran out of time)" ;; esac
    echo "=== $name: exit $status$note after $((SECONDS - start)) s" | tee -a "$out/summary.log"
    [ "$status" -eq 0 ] || failed=1
}

versions() {
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_mode --format=csv
    echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(free -g | awk '/Mem/ {print $2}') GiB"
    df -h /dev/shm "${TMPDIR:-/tmp}"
    "$py" - <<'EOF'
import platform

import numpy
import PIL
import torch
from PIL import features

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
# The loader's speed is mostly PNG decoding, whose speed is mostly the zlib that Pillow was built with
# (Pillow before 11 cannot say whether it is zlib-ng).
zlib_ng = features.check_feature("zlib_ng") if "zlib_ng" in features.features else "unknown"
print(f"Pillow {PIL.__version__} (zlib {features.version('zlib')}, zlib-ng {zlib_ng}), numpy {numpy.__version__}")
EOF
}

train_check() {  # train.py for 300 iterations at batch 8, then the projection of the 40k row; $1: --compile or nothing
    local run="$scratch/run${1:+_compile}"
    "$py" tools/gpu_check/synthetic_cityscapes.py "$scratch/cityscapes" || return 1
    "$py" train.py --dataset cityscapes --data-root "$scratch/cityscapes" --pretrained none --batch-size 8 \
        --iters 300 --eval-interval 300 --log-interval 1 --workers 15 --no-pictures --work-dir "$run" ${1:-} \
        || return 1
    cp "$run/log.jsonl" "$out/train${1:+_compile}_log.jsonl"
    # run_time.py leaves out the first 20 steps: cuDNN's search, the loader's start, and compiling.
    "$py" tools/gpu_check/run_time.py "$run" --iters 40000 --validations 10
}

export py out scratch
export -f versions train_check

steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then
    steps=(versions tests r50 r101 loader train)
fi
echo "=== $(date -u +%FT%TZ) check_gpu.sh ${steps[*]} at $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
    | tee -a "$out/summary.log"
for step in "${steps[@]}"; do
    case $step in
        versions) run_step versions "${VERSIONS_TIMEOUT:-20}" bash -c versions ;;
        tests) run_step tests "${TESTS_TIMEOUT:-240}" "$py" -m pytest -q -rfEs tests/test_cuda.py ;;
        r50 | r50compile)
            compile=(--no-compile)
            [ "$step" = r50compile ] && compile=()
            run_step "benchmark_$step" "${R50_TIMEOUT:-$([ "$step" = r50 ] && echo 170 || echo 360)}" "$py" tools/gpu_check/targets.py \
                --dataset cityscapes --crop 512x1024 --timed 10 --warmup 3 --data-samples 10 --wide --profile ${compile[@]+"${compile[@]}"} \
                --out "$out/benchmark_$step.json"
            ;;
        r101)
            # The data pipeline does not depend on the depth (r50 times it).
            run_step benchmark_r101 "${R101_TIMEOUT:-125}" "$py" tools/gpu_check/targets.py --dataset cityscapes --crop 512x1024 \
                --depth 101 --timed 10 --warmup 3 --data-samples 2 --wide --no-compile --out "$out/benchmark_r101.json"
            ;;
        nonlocal)
            # The paper's comparison on the GPU (README): the NonLocal model of the same row, bf16 variants only.
            run_step benchmark_nonlocal "${NONLOCAL_TIMEOUT:-150}" "$py" tools/gpu_check/targets.py --dataset cityscapes \
                --crop 512x1024 --context nonlocal --precision bf16 --channels-last --timed 3 --warmup 2 \
                --data-samples 1 --wide --no-compile --out "$out/benchmark_nonlocal.json"
            ;;
        loader)
            run_step loader "${LOADER_TIMEOUT:-150}" "$py" tools/gpu_check/loader_speed.py --workers 8 15 --batch-size 8 \
                --batches 40 --decoded --out "$out/loader.json"
            ;;
        train) run_step train "${TRAIN_TIMEOUT:-150}" bash -c train_check ;;
        traincompile) run_step traincompile "${TRAINCOMPILE_TIMEOUT:-330}" bash -c "train_check --compile" ;;
        *)
            echo "unknown step $step: choose from versions tests r50 r50compile r101 nonlocal loader train traincompile" \
                | tee -a "$out/summary.log"
            failed=1
            ;;
    esac
done

# The digest: what a reader of the last screenful wants.
echo "=== digest"
cat "$out/summary.log"
grep -h -E "^(cuda:|python |Pillow |NCCL|host:)" "$out/versions.log" 2>/dev/null
tail -n 15 "$out/tests.log" 2>/dev/null
for row in r50 r50compile r101 nonlocal; do
    log="$out/benchmark_$row.log"
    [ -f "$log" ] && sed -n '/^| Method/,/^$/p;/^targets/,$p' "$log"
done
grep -h -E "workers:|^loader" "$out/loader.log" 2>/dev/null
grep -h -E "^(projected|[0-9]+ iterations measured)|val mIoU" "$out/train.log" "$out/traincompile.log" 2>/dev/null
exit $failed
