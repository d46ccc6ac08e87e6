#!/usr/bin/env bash
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
KVTRITON_TRACE=/tmp/tr_lat timeout 60 python3 -m kvtriton.transfer.bench_latency --requests 200 2>&1 | tail -1
python3 scripts/trace_report.py /tmp/tr_lat | tee "$OUT/trace_latency.txt"
KVTRITON_TRACE=/tmp/tr_x timeout 120 python3 -m kvtriton.transfer.bench --sizes-mib 1024 --reps 3 --json "$OUT/transfer1g.json" 2>&1 | tail -4
python3 scripts/trace_report.py /tmp/tr_x | tee "$OUT/trace_transfer.txt"
