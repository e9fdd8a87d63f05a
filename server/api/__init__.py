"""The HTTP and WebSocket layer. It sees only the engine's client interface, never a tensor."""

from server.api import generate, jobs, openai, stream, system

ROUTERS = (system.public, system.protected, generate.router, jobs.router, jobs.websocket_router, stream.router, openai.router)

__all__ = ["ROUTERS"]
