"""Continuous-batching generation engine (see `audiogen.engine.engine`)."""

from audiogen.engine.engine import Engine
from audiogen.engine.handle import GenerationResult, RequestHandle
from audiogen.engine.request import GenerationRequest, ResolvedRequest
from audiogen.engine.stats import EngineSnapshot

__all__ = ["Engine", "EngineSnapshot", "GenerationRequest", "GenerationResult", "RequestHandle", "ResolvedRequest"]
