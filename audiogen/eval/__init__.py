"""Evaluation: objective measurements of generated and reconstructed audio (`audiogen.eval.audio_metrics`)."""
