"""The attention implementation a caller asks for: a light enum with no kernel imports.

`pijax.config` names it in `EngineConfig`; importing it must not pull in Pallas or any backend
lowering (`pijax.kernels.dispatch` does that, and only when attention is traced).
"""

from __future__ import annotations

import enum


class AttentionImpl(enum.Enum):
    AUTO = "auto"  # a kernel where the shape is supported (see `support`), else the XLA reference
    REFERENCE = "reference"
    PALLAS = "pallas"  # the backend's kernel; refuses shapes outside the supported table
    PALLAS_INTERPRET = "pallas_interpret"  # GPU-style kernels, interpret=True (tests, any backend)
    TILED = "tiled"  # XLA, K/V gathered once per (sequence, query tile): what auto runs on CPU

    @classmethod
    def parse(cls, value: str | AttentionImpl) -> AttentionImpl:
        if isinstance(value, AttentionImpl):
            return value
        allowed = [m.value for m in cls]
        if value not in allowed:
            raise ValueError(f"attention_impl must be one of {allowed}; got {value!r}")
        return cls(value)
