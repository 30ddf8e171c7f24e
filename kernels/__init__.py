"""Paged-attention kernels and their pure-JAX references (importable as `pijax.kernels`).

Arrays in, arrays out: nothing here knows about requests, schedulers or the engine.
`dispatch` is the single entry point the engine calls.
"""
