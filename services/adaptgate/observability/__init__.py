"""Operations support: JSON logs with a request id, an access line per call, OpenTelemetry traces.

One request, one `ObservedRequest` (requests.py) in a context variable: the gRPC interceptor
(grpc_server.py) and the ASGI middleware (asgi.py) open it, the shared RPC and HTTP code notes what
only it knows (tenant, method, status), admission notes texts and adapters (admission.py), the
batcher records when rows queued and ran (engine.batcher.SUBMIT_TIMINGS), and on the way out one
place writes the access line and the spans. The engine never imports any of this.
"""
