"""sevi-serve's HTTP service: FastAPI app, schemas, engines, settings and metrics (issue 3).

`server` uses `sevi`, never the reverse. Routes know engines and schemas, not attention internals.
"""
