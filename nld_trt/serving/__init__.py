"""Serving: a Triton model repository with the decoding mode chosen per request, and the tools around it.

- `package`: checkpoint -> model repository (`nld` streaming, `nld_sync` one response; artifacts + manifest)
- `triton_model` / `backend`: the Python-backend model: manifest check, `load_artifacts`, continuous batching
- `server`: start the real tritonserver binary on a repository; `client`: gRPC streaming and HTTP clients
- `cli`: `nld-trt package | serve | client | chat | demo`
"""
