"""Shared test setup.

Without a GPU, the Triton kernels run under the Triton interpreter on CPU tensors: that
needs ``TRITON_INTERPRET=1`` before any ``@triton.jit`` function is defined, so it is set
here, at collection time, before test modules import ``kvtriton.kernels``.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI runs at least 500 examples per property (the project's floor; no test overrides
# max_examples); a quick local loop can set HYPOTHESIS_PROFILE=dev. Shared specs, oracles and
# DEVICES live in kvtriton.testing.
settings.register_profile(
    "ci", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
