#!/usr/bin/env bash
# Everything this project checks on a CUDA machine, in stages, for short leases of a GPU:
#
#   scripts/gpu_session.sh build tests bench-attention bench-rest
#
#   build            the extension for this GPU (CPU + CUDA objects) into the current Python
#   tests            the whole test suite on the GPU machine (Triton tests run compiled on the GPU,
#                    the `gpu`-marked CUDA checks run); log: $OUT/tests.log. The AOT compile tests
#                    are left to CI: they check the pinned toolchain (torch 2.14.1's Triton), and
#                    the machine's own torch/Triton may differ
#   tune             scripts/tune_attention_gpu.py: tile-size sweep, $OUT/tune.json
#   tune-combined    the same for whole configs, through ops.attention: $OUT/tune-combined.json
#   bench            `pytest bench/ --benchmark` without the static-kernel suite (CPU-side AOT work):
#                    $OUT/bench.json, published as bench/results/gpu-<gpu>.json
#   bench-attention  the attention suite alone (TFLOP/s, vs SDPA/Flex): $OUT/bench-attention.json
#   bench-rest       the other suites: $OUT/bench-rest.json
#
# Every stage runs even when an earlier one failed; the exit status is that of the first failure.
# Python packages the machine lacks can be put in .gpu/site (kept out of git) and travel with it.
set -u
OUT=${OUT:-/tmp/transfusion_fast_gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -d .gpu/site ] && export PYTHONPATH=$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}
status=0

run_stage() {  # name, command...
    local name=$1; shift
    local start=$SECONDS
    echo "=== $name"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc in $((SECONDS - start)) s"
    [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
    return 0
}

build() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    local arch
    arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    [ "$arch" = 9.0 ] && arch=9.0a
    TORCH_CUDA_ARCH_LIST="8.0;$arch" MAX_JOBS=$(nproc) \
        $PY -m pip install -q --no-build-isolation --no-deps --disable-pip-version-check -e .
}

tests() {
    $PY -m pytest tests -q -rs -p no:cacheprovider -n 8 --timeout 600 -k "not aot"
}

bench() {  # stage name, pytest arguments...
    local name=$1; shift
    $PY -m pytest "$@" -q -p no:cacheprovider --benchmark --benchmark-json "$OUT/$name.json"
}

for stage in "$@"; do
    case $stage in
        build) run_stage build build ;;
        tests) run_stage tests tests ;;
        tune) run_stage tune $PY scripts/tune_attention_gpu.py --json "$OUT/tune.json" ;;
        tune-combined) run_stage tune-combined $PY scripts/tune_attention_gpu.py --combined \
                           --json "$OUT/tune-combined.json" ;;
        bench) run_stage bench bench bench bench --ignore bench/test_bench_static_kernels.py ;;
        bench-attention) run_stage bench-attention bench bench-attention bench/test_bench_attention.py ;;
        bench-rest) run_stage bench-rest bench bench-rest bench --ignore bench/test_bench_attention.py \
                        --ignore bench/test_bench_static_kernels.py ;;
        *) echo "unknown stage: $stage" >&2; exit 2 ;;
    esac
done
exit $status
