#!/usr/bin/env bash
# One step of the GPU run, sized for one 10-minute call of a borrowed GPU machine that has
# torch, transformers, timm and torchvision but no Jupyter packages:
#
#   bash benchmarks/device_run.sh tests|density|dataplane|compile
#
# Every result goes under $OUT (default ./device-out): a command's output is a file, never a
# pipe (a pipe would wait on the agents' inherited stdout), and each command has its own
# timeout so a step returns what it has instead of nothing. Wheels the machine lacks are
# read from $WHEELS (default .whl): py-spy for the profile, and SQLAlchemy, tornado and
# traitlets (density/) for the broker of the density benchmark. Made on the dev machine with
#   pip download --no-deps -d .whl py-spy
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl/density \
#     sqlalchemy tornado traitlets
# and carried with the call (carry: [".whl"]; .git/info/exclude keeps it out of commits).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-device-out}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s)

left() { echo $(( ${BUDGET:-570} - ($(date +%s) - T0) )); }
run() {  # run NAME SECONDS CMD...: output to $OUT/NAME.txt, rc and time to $OUT/times.txt
  local name=$1 limit=$2 s; shift 2
  s=$(date +%s)
  (( limit > $(left) )) && limit=$(left)
  if (( limit < 20 )); then echo "$name skipped: no time left" >> "$OUT/times.txt"; return; fi
  timeout -k 10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name rc=$? $(( $(date +%s) - s ))s" >> "$OUT/times.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  python -c "import torch; print('torch', torch.__version__)"; } > "$OUT/machine.txt" 2>&1

case "${1:-}" in
  tests)  # correctness of the data plane and compile path on a CUDA agent
    ELASTIC_GPU_TEST_DEVICE=cuda run pytest 560 python -m pytest -q -p no:cacheprovider \
      tests/agent/test_swap.py tests/agent/test_slices.py tests/remote/test_warm_up.py \
      tests/remote/test_cuda_semantics.py tests/remote/test_training_parity.py \
      tests/remote/test_signatures.py tests/agent/test_bulk_streams.py \
      tests/remote/test_client_hot_path.py tests/remote/test_compile.py ;;
  density)  # issue #17 (MODES=elastic SWAP_POLICY=ahead: the other swap policy)
    pip install -q --no-index --no-deps --target /tmp/dsite "$WHEELS"/density/*.whl \
      > "$OUT/pip.txt" 2>&1
    PYTHONPATH=$PWD:/tmp/dsite run density 540 python benchmarks/density.py --device cuda \
      --users "${USERS:-8,12,16}" --modes "${MODES:-elastic,timeslice,exclusive}" \
      --swap-policy "${SWAP_POLICY:-pressure}" --scale 0.15 --window "${WINDOW:-200}" \
      --out "$OUT/density-gpu.json" \
      --plot "$OUT/density-gpu.png" ;;
  dataplane)  # issue #15
    pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/py_spy*.whl \
      > "$OUT/pip.txt" 2>&1
    export PATH=/tmp/site/bin:$PATH
    run real_models 330 python benchmarks/real_models.py --device cuda --workloads \
      "${WORKLOADS:-sync_latency,first_op,h2d,d2h,cell_mix,small_ops,gpt2_train,resnet50}" \
      --out "$OUT/real_models.json"
    run bulk 120 python benchmarks/bulk.py --device cuda --streams 0,1,2,4,8 \
      --sizes 2,8,32,256
    run client_op 40 python benchmarks/client_op.py --device cuda
    run profile 100 python benchmarks/profile_remote.py --device cuda --workload gpt2_train \
      --seconds 8 --out "$OUT/profile_gpt2.json" ;;
  compile)  # issue #16
    run compile 560 python benchmarks/compile_vs_native.py --device cuda --autocast bf16 \
      --workloads gpt2_train,resnet50 --out "$OUT/compile.json" ;;
  *)
    echo "usage: $0 tests|density|dataplane|compile" >&2
    exit 2 ;;
esac
cat "$OUT/times.txt"
