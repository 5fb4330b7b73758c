"""Serving: a Triton model repository with the decoding mode chosen per request, and the tools around it.

- `package`: checkpoint -> model repository (`nld` streaming, `nld_sync` one response, `nld_tokenizer` the
  tokenizer alone; artifacts + manifest); `cache`: `serve MODEL_DIR`'s cached repositories
- `triton_model` / `backend`: the Python-backend model: manifest check, `load_artifacts`, continuous batching
- `protocol`: the models' tensors and request parsing; `tokenize` / `tokenizer_model`: the tokenizer model
- `server`: start the real tritonserver binary on a repository; `client`: gRPC streaming and HTTP clients
- `openai/`: the OpenAI-compatible front end; `cli`: `nld-trt package | serve | openai | client | chat | demo`
"""
