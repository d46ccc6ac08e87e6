#!/usr/bin/env python
"""CPU microbenchmark of the cache manager (match + allocate + commit); same as
``kvtriton bench cache``. See kvtriton/cache/bench.py for what is measured."""

import sys

from kvtriton.cache.bench import main

if __name__ == "__main__":
    sys.exit(main())
