#!/usr/bin/env bash
# One device call (one H200): the transfer benchmarks, then the GPU tests, then the demo;
# results under $OUT. Ordered by what matters most, each step bounded, so that a call cut
# short still returns what ran. Usage: OUT=/tmp/out bash scripts/gpu_session.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
timeout 130 python3 -m kvtriton.transfer.bench --sizes-mib 16,64,256,1024 --reps 3 --json "$OUT/transfer.json" 2>&1 | tail -14 | tee "$OUT/transfer.txt"
KVTRITON_TRACE=/tmp/tr_lat timeout 50 python3 -m kvtriton.transfer.bench_latency --requests 300 --json "$OUT/latency.json" 2>&1 | tail -3 | tee "$OUT/latency.txt"
python3 scripts/trace_report.py /tmp/tr_lat > "$OUT/trace_latency.txt" 2>&1
timeout 80 python3 -m kvtriton.transfer.ttft --model gpt-oss-20b --prompt 4096 --history 3072 --layer-ms 3 --reps 3 --json "$OUT/ttft.json" 2>&1 | tail -8 | tee "$OUT/ttft.txt"
timeout 100 python3 -m pytest tests/test_transfer_gpu.py -q -p no:cacheprovider -p no:randomly 2>&1 | tail -6 | tee "$OUT/gpu_tests.txt"
timeout 90 python3 -m pytest tests/test_kernels.py tests/test_kernels_plan.py -m "not slow" -q -x -p no:cacheprovider -p no:randomly 2>&1 | tail -4 | tee "$OUT/kernel_tests.txt"
timeout 45 python3 -m kvtriton demo --channel ipc 2>&1 | tail -6 | tee "$OUT/demo.txt"
