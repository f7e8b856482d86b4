"""Ray pipelines over the audiogen engine: batch rendering, serving, training, encoding."""
