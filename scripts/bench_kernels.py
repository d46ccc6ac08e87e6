"""Benchmark the paged gather/scatter/copy kernels (see kvtriton/kernels/bench.py).

python scripts/bench_kernels.py --json bench.json        # on a GPU
python scripts/bench_kernels.py --device cpu --quick   # CPU smoke test (Triton interpreter)
"""

import sys

from kvtriton.kernels.bench import main

if __name__ == "__main__":
    sys.exit(main())
