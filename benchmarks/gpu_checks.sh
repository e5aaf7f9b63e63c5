#!/usr/bin/env bash
# Every GPU check and measurement of this project, as prepared runs of under 10 minutes each.
#
#   bash benchmarks/gpu_checks.sh                        # bench profile (~2 minutes with the start)
#   bash benchmarks/gpu_checks.sh checks sweep sweep32 small   # (~8 minutes, compiles the most)
#
# A device command may take at most 10 minutes. Steps, each under a timeout, with its log and
# JSON under $OUT (the device tool's output folder) or ./gpu_checks:
#   bench     benchmarks/gpu_bench.py, bfloat16 and float32, both layouts (120 s each)
#   profile   benchmarks/gpu_profile.py: the kernels of BN+ReLU forward+backward, channels_last
#             and NCHW float32, ours and torch's (90 s each)
#   checks    tests/kernels/_triton_checks.py: CI's interpreter checks, compiled for the GPU (300 s;
#             it compiles every kernel variant it uses, one after another)
#   sweep     benchmarks/gpu_tile_sweep.py, bfloat16 (240 s)
#   sweep32   benchmarks/gpu_tile_sweep.py --dtype float32 (150 s)
#   small     batchnorm bench on small shapes with the triton backend, then forced to the reference
#             backend (torch ops): whether the dispatcher should route small GPU tensors elsewhere
set -u
OUT=${OUT:-gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # batchnorm from this checkout, installed or not
STEPS=${*:-bench profile}
SMALL="--shape 8,16,8,8 --shape 32,64,14,14 --shape 64,128,28,28 --layouts contiguous --dtype bfloat16"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt" 2>&1
for m in numpy numba rich matplotlib; do  # what batchnorm and the benches import
    python -c "import $m" 2> /dev/null || echo "missing python module: $m" >> "$OUT/gpu.txt"
done
cat "$OUT/gpu.txt"

step() {  # step NAME TIMEOUT COMMAND...
    local name=$1 limit=$2 start
    shift 2
    start=$(date +%s)
    echo "== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc after $(( $(date +%s) - start )) s"
}

for s in $STEPS; do
    case $s in
        checks) step checks 300 python tests/kernels/_triton_checks.py ;;
        bench)
            step bench 120 python benchmarks/gpu_bench.py --dtype bfloat16 --out "$OUT/bench.json"
            step bench_fp32 120 python benchmarks/gpu_bench.py --dtype float32 --out "$OUT/bench_fp32.json" ;;
        profile)
            step profile_cl 90 python benchmarks/gpu_profile.py --layout channels_last --trace "$OUT"
            step profile_nchw 90 python benchmarks/gpu_profile.py --layout contiguous ;;
        sweep32) step sweep32 150 python benchmarks/gpu_tile_sweep.py --dtype float32 --repeats 30 \
            --out "$OUT/sweep_fp32.json" ;;
        sweep) step sweep 240 python benchmarks/gpu_tile_sweep.py --repeats 40 --out "$OUT/sweep.json" ;;
        small)
            step small_triton 120 python -c "import sys; from batchnorm.cli import main; sys.exit(main())" \
                bench --device cuda $SMALL --out "$OUT/small_triton.json"
            BATCHNORM_BACKEND=reference step small_reference 120 python -c \
                "import sys; from batchnorm.cli import main; sys.exit(main())" \
                bench --device cuda $SMALL --out "$OUT/small_reference.json" ;;
        *) echo "unknown step $s (bench, profile, checks, sweep, sweep32, small)"; exit 2 ;;
    esac
done
