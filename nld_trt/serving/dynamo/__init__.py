"""Scale-out with NVIDIA Dynamo: many nld-trt Triton deployments behind one OpenAI endpoint.

- `request`: a request as Dynamo's frontend preprocessed it, described for the one request mapping
  (serving/openai/mapping.py); NLD's fields come as `nvext.annotations` (`nld.mode=dlm`)
- `worker`: `nld-trt dynamo-worker`, one tritonserver as a token-in Dynamo worker (registration, streaming over
  gRPC, cancellation, errors)
- `kv`: the deployment's KV events (serving/kv_events.py) relayed to Dynamo's KV router
- `cluster`: `nld-trt cluster`, N tritonservers + N workers + one Dynamo frontend on one machine, on loopback
- `cli`: the two commands

Dynamo itself (`ai-dynamo`, `ai-dynamo-runtime`) is an optional install (the `dynamo` extra); nothing here imports
it at module level, so nld-trt works without it and these commands say what to install.
"""
