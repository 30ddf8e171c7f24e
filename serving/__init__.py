"""pijax.serving: the gRPC service (`pijax.v1.Inference`) in front of the engine.

`server.InferenceServer` wires it together: the servicer (protos <-> engine types), the engine
loop (the one thread that owns the engine), API-key auth, validation, sessions, structured output
and metrics. It uses only the engine's public API. See README.md beside this file.
"""
