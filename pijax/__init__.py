"""pijax: a JAX inference engine for LLM agents that review healthcare claims.

    from pijax import LLM, SamplingParams
    llm = LLM()                                   # the embedded default model
    outs = llm.generate(["text", [1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=32))

Names are imported lazily so that `import pijax.kernels` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "pijax.engine",
    "Engine": "pijax.engine",
    "CompletionOutput": "pijax.engine",
    "SamplingParams": "pijax.request",
    "RequestOutput": "pijax.request",
    "FinishReason": "pijax.request",
    "InvalidRequestError": "pijax.request",
    "OverloadedError": "pijax.request",
    "EngineConfig": "pijax.config",
    "CacheConfig": "pijax.config",
    "SchedulerConfig": "pijax.config",
    "ModelConfig": "pijax.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pijax' has no attribute {name!r}")
