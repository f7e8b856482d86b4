"""Continuous-batching generation engine (see `audiogen.engine.engine`)."""

from audiogen.engine.engine import Engine
from audiogen.engine.handle import GenerationResult, RequestHandle
from audiogen.engine.request import GenerationRequest, ResolvedRequest

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "RequestHandle", "ResolvedRequest"]
