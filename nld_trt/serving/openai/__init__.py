"""The OpenAI-compatible API in front of an nld-trt Triton deployment, and its web chat page.

- `schema`: OpenAI request validation; each request described for the mapping
- `mapping`: the one request mapping (Generation, prompts, Outputs -> the model's inputs), shared with the
  Dynamo worker (nld_trt/serving/dynamo)
- `triton`: the async gRPC bridge to the decoupled model `nld` (tritonclient.grpc.aio)
- `app`: the FastAPI routes, OpenAI's response and SSE chunk shapes, the chat page (`page.html`) at `/`
- `frontend`: uvicorn beside tritonserver (`nld-trt serve`) or on its own (`nld-trt openai`)
"""
