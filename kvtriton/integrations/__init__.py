"""Bridges between kvtriton pools and the KV caches of model libraries.

Each bridge lives in its own submodule and imports its library lazily, so importing
``kvtriton.integrations`` never imports torch or transformers:

* :mod:`kvtriton.integrations.transformers` -- Hugging Face transformers ``DynamicCache``
  (full-attention and sliding-window layers) to and from paged kvtriton pools.
"""

from __future__ import annotations

__all__: list[str] = []
