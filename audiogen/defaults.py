"""The embedded default model, used when no checkpoint is given (Python API, every CLI command, pipelines).

It is the project's demo model: trained from scratch by `jobs/demo_model.py` on the procedural corpus of
`audiogen.data.synth` and shipped as package data (`audiogen/weights/demo`, the native format with float16
weights; `MODEL_CARD.md` there says what it knows and how well). It renders recognisable tones, sweeps, sirens,
coloured noise and beats from captions like "a high beep repeating quickly"; anything else gets its nearest guess.

`DEFAULT_MODEL` is the spec string that names it wherever a model or codec spec is accepted (`--codec`, `--base`).
"""

from __future__ import annotations

from pathlib import Path

from audiogen.errors import MissingCheckpointFileError

DEFAULT_MODEL = "default"
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "demo"


def default_model_path() -> Path:
    """The demo model's directory inside the installed package; a clear error if the install lacks it."""
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise MissingCheckpointFileError(
            f"the embedded demo model is missing from {DEMO_MODEL_DIR} (an install without package data?): "
            "reinstall audiogen, pass a model directory, or rebuild it with "
            "`python jobs/demo_model.py WORK --ship audiogen/weights/demo`")
    return DEMO_MODEL_DIR


def resolve_model_spec(spec: str) -> str:
    """`DEFAULT_MODEL` becomes the demo model's directory; every other spec is returned unchanged."""
    return str(default_model_path()) if spec == DEFAULT_MODEL else spec
