"""`jaxinfer serve`: an OpenAI-compatible HTTP server over one or more engine replicas.

backend.py   the Backend interface the server talks to (GenRequest in, Events out) and
             InProcessBackend, one engine in this process
protocol.py  OpenAI request bodies -> token ids and SamplingParams, checked by the Python API's code;
             the OpenAI error body
metrics.py   Prometheus metrics, one registry per app
app.py       the FastAPI app (`make_app`) and `serve`, which runs it under uvicorn and drains on SIGTERM

Importing this package loads neither FastAPI nor jax.
"""
