"""Serving the aligned model and the reward model with Ray Serve (OpenAI-compatible HTTP API).

`app.py` is the application (FastAPI ingress + deployment handles), `chat.py` and `reward.py` the model
deployments, `protocol.py` the wire format and request checks, `config.py` the `serve:` section,
`llm.py` the GPU path through `ray.serve.llm`. See docs/serving.md.
"""
