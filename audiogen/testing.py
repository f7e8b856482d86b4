"""The tests' names for the seeded random models of `audiogen.scratch` (tests, smoke runs and benchmarks build
their tiny models with these; production code imports `audiogen.scratch` itself)."""

from audiogen.scratch import random_codec as tiny_codec
from audiogen.scratch import random_model as tiny_model
from audiogen.scratch import small_t5_config as tiny_t5_config
from audiogen.scratch import word_list
from audiogen.scratch import word_tokenizer as tiny_tokenizer

__all__ = ["tiny_codec", "tiny_model", "tiny_t5_config", "tiny_tokenizer", "word_list"]
