"""What `POST /v1/continue` and `/v1/inpaint` uploads carry: multipart bodies (parsed on the ingress) and
inpainting masks (turned into one flag per sample on the engine replica, where the model's rates are known).

Both are CPU work that callers run in a worker thread (`asyncio.to_thread`), never on a replica's event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from audiogen.errors import InvalidRequestError

MAX_FORM_FIELDS = 32


def parse_multipart(headers: Mapping[str, str], body: bytes) -> tuple[dict[str, Any], bytes]:
    """A whole multipart body -> (form fields, audio file bytes). Fields may also come as one JSON object in a
    `request` field (explicit fields win). Blocking: run it in a worker thread."""
    if not headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequestError("body", "expected a multipart/form-data upload",
                                  limit="multipart/form-data with an `audio` file")
    return asyncio.run(_parse(headers, body))


async def _parse(headers: Mapping[str, str], body: bytes) -> tuple[dict[str, Any], bytes]:
    async def replay() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(headers, replay(), max_files=1, max_fields=MAX_FORM_FIELDS).parse()
    except MultiPartException as error:
        raise InvalidRequestError("body", f"bad multipart body: {error.message}",
                                  limit=f"one file, at most {MAX_FORM_FIELDS} fields") from None
    fields: dict[str, Any] = {}
    audio: bytes | None = None
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "audio":
                    raise InvalidRequestError(key, "unexpected file", limit="one file: audio")
                audio = await value.read()
            elif key == "request":
                fields = {**_json_object(value), **fields}
            else:
                fields[key] = value
    finally:
        await form.close()
    if audio is None:
        raise InvalidRequestError("audio", "no audio file uploaded", limit="a multipart file field named audio")
    return fields, audio


def _json_object(text: str) -> dict[str, Any]:
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidRequestError("request", "is not a JSON object", limit="a JSON object of the endpoint's fields")
    return parsed


def sample_mask(mask: list[Any], samples: int, rate: int, model_rate: int, hop: int) -> np.ndarray:
    """The API's mask (spans in seconds, or one boolean per codec frame) -> one boolean per uploaded sample."""
    duration = samples / rate
    if mask and all(isinstance(item, bool) for item in mask):
        frames = math.ceil(math.floor(samples * model_rate / rate) / hop) or 1
        if len(mask) != frames:
            raise InvalidRequestError("mask", f"has {len(mask)} frame flags for {duration:.3f} s of audio",
                                      limit=f"one entry per codec frame ({frames})")
        frame_rate = model_rate / hop
        spans = [(i / frame_rate, (i + 1) / frame_rate) for i, flag in enumerate(mask) if flag]
    else:
        spans = [tuple(span) for span in mask]
        for index, (start, end) in enumerate(spans):
            if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end <= duration + 1e-6):
                raise InvalidRequestError(f"mask[{index}]", f"span [{start}, {end}] does not fit the audio",
                                          limit=f"0 <= start < end <= {duration:.3f} s")
    if not spans:
        raise InvalidRequestError("mask", "selects nothing to regenerate", limit="at least one span or True frame")
    times = np.arange(samples) / rate
    selected = np.zeros(samples, dtype=bool)
    for start, end in spans:
        selected |= (times >= start) & (times < end)
    if not selected.any():
        raise InvalidRequestError("mask", "selects no sample of the audio", limit="spans covering a sample")
    return selected
