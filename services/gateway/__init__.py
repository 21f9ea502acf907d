"""The HTTP/JSON gateway: a web client's way into the mesh (browsers cannot call gRPC).

``POST /v1/tasks`` answers ``202 Accepted`` once ingest accepted the task; ``GET /v1/tasks/{id}/events``
streams its updates as Server-Sent Events, ``GET /v1/ws`` many tasks' updates over one WebSocket; errors are
RFC 9457 problem objects. The gateway is a gRPC client of ingest and the notifier and holds no state of its
own: API keys are forwarded, and ingest and the notifier authenticate them.

Built on FastAPI (on Starlette, served by uvicorn) with sse-starlette, rather than plain Starlette or aiohttp:
FastAPI validates path, query and header parameters and documents them, with the routes' responses, in the
OpenAPI document it generates from the routes themselves (checked in as docs/openapi.json and tested against
them); Starlette brings WebSockets and streaming responses; sse-starlette does the Server-Sent Events framing,
heartbeats, client disconnects and uvicorn's graceful shutdown of open streams.
"""
