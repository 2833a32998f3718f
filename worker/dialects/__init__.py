"""Upstream dialects, one small module each; ``get(name)`` returns one."""

from __future__ import annotations

from worker.dialects import ollama, openai_chat, openai_completions, tgi, together
from worker.dialects.base import DONE, Continuation, Delta, Dialect

_ALL = {
    d.name: d
    for d in (
        together.DIALECT,
        openai_completions.DIALECT,
        openai_chat.DIALECT,
        tgi.DIALECT,
        ollama.DIALECT,
    )
}


def get(name: str) -> Dialect:
    """The dialect called ``name``; ``KeyError`` for an unknown one."""
    return _ALL[name]


__all__ = ["DONE", "Continuation", "Delta", "Dialect", "get"]
