#!/usr/bin/env python
"""kvtriton transfer end to end vs raw NCCL send/recv of the same bytes (2 GPUs).

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 scripts/bench_transfer.py --json t.json

See kvtriton/transfer/bench.py for what is measured.
"""

import sys

from kvtriton.transfer.bench import main

if __name__ == "__main__":
    sys.exit(main())
