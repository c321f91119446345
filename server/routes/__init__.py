"""One router per endpoint group; `ROUTERS` is what the app mounts."""

from server.routes import caption, chat, health, metrics, models, playground

ROUTERS = [caption.router, chat.router, models.router, health.router, metrics.router, playground.router]
