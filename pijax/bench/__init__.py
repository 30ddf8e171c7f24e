"""The benchmark suite (`scripts/bench.py`): the payment-integrity mix against the engine and its
baselines, side by side in one process and one run.

  presets.py  bench presets (`configs/bench/*.json`): model, engine limits, workload, arrivals
  driver.py   arrivals (Poisson or closed-loop clients), session turn chaining, prompt history
  runner.py   drives one engine through a workload; per-turn token times, per-step pool samples
  hf.py       the transformers baseline: same weights, same requests, `generate` in padded batches
  probes.py   the decode roofline (measured copy bandwidth and matmul rate), ITL under a long
              arrival, unloaded TTFT with and without prefix reuse
  metrics.py  percentiles and the per-configuration summary
  report.py   JSON and Markdown; plots.py the PNGs
  suite.py    which configurations run, in what order, and the ratios between them
  meshes.py   the mesh sweep (`--mesh_shapes`): each (data, model) mesh at one per-device KV
              budget, its capacity and throughput

Absolute times on shared CPUs are noise: every figure that matters is a ratio between
configurations measured in the same run (DESIGN.md, "Performance: how we measure").
"""
