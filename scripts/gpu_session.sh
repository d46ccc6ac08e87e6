#!/usr/bin/env bash
# One device call: the GPU tests of the transfer layer and its benchmarks (results under $OUT).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
timeout 200 python3 -m pytest tests/test_transfer_gpu.py -q -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
timeout 60 python3 -m kvtriton.transfer.bench_latency --requests 300 --json "$OUT/latency.json" 2>&1 | tail -3
timeout 150 python3 -m kvtriton.transfer.bench --sizes-mib 16,64,256,1024 --reps 3 --json "$OUT/transfer.json" 2>&1 | tail -12
timeout 100 python3 -m kvtriton.transfer.ttft --model gpt-oss-20b --prompt 4096 --history 3072 --layer-ms 3 --reps 3 --json "$OUT/ttft.json" 2>&1 | tail -8
timeout 60 python3 -m kvtriton demo 2>&1 | tail -6
