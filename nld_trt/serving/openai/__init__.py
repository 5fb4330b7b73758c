"""The OpenAI-compatible API in front of an nld-trt Triton deployment, and its web chat page.

- `schema`: OpenAI request validation, and the model inputs each request becomes
- `triton`: the async gRPC bridge to the decoupled model `nld` (tritonclient.grpc.aio)
- `app`: the FastAPI routes, OpenAI's response and SSE chunk shapes, the chat page (`page.html`) at `/`
- `frontend`: uvicorn beside tritonserver (`nld-trt serve`) or on its own (`nld-trt openai`)
"""
