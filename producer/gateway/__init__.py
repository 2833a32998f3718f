"""The HTTP gateway: Together- and OpenAI-compatible routes and the jobs API, on Starlette.

tokenrelay gateway --host 0.0.0.0 --port 8000
"""

from __future__ import annotations

import logging

import uvicorn

from producer import logs
from producer.gateway.app import create_app
from producer.heap import freeze_startup
from producer.settings import Settings

__all__ = ["create_app", "serve"]


def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the gateway under uvicorn until interrupted."""
    logs.configure(Settings.from_env().log_format)
    app = create_app()
    freeze_startup(logging.getLogger("tokenrelay.gateway"))
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=False,  # query strings may hold an access token
        timeout_graceful_shutdown=5,
    )
