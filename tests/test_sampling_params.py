"""`SamplingParams`: one validation for every entry point, model defaults and limits applied by `resolved`."""

import math

import numpy as np
import pytest

from audiogen.errors import InvalidRequestError
from audiogen.sampling_params import MAX_SEED, SamplingParams


@pytest.mark.parametrize(("fields", "field", "limit"), [
    ({"temperature": -0.1}, "temperature", "0 <= temperature <= 100"),
    ({"temperature": math.nan}, "temperature", "0 <= temperature <= 100"),
    ({"temperature": "hot"}, "temperature", "0 <= temperature <= 100"),
    ({"top_p": 1.5}, "top_p", "0 <= top_p <= 1"),
    ({"top_p": math.inf}, "top_p", "0 <= top_p <= 1"),
    ({"top_k": -1}, "top_k", "0..codebook size"),
    ({"top_k": 2.5}, "top_k", "0..codebook size"),
    ({"top_k": True}, "top_k", "0..codebook size"),
    ({"guidance_scale": 101}, "guidance_scale", "0 <= guidance_scale <= 100"),
    ({"seed": -1}, "seed", f"0..{MAX_SEED}"),
    ({"seed": MAX_SEED + 1}, "seed", f"0..{MAX_SEED}"),
    ({"negative_prompt": 3}, "negative_prompt", None),
    ({"negative_prompt": "a\x00b"}, "negative_prompt", None),
])
def test_bad_values_name_the_field_and_the_limit(fields, field, limit):
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(**fields)
    assert caught.value.field == field
    assert caught.value.limit == limit or caught.value.limit.startswith(f"{limit} (")


def test_values_are_normalised_to_python_numbers():
    params = SamplingParams(seed=np.int64(7), top_k=np.int32(50), temperature=1, top_p=np.float32(0.5),
                            guidance_scale=3)
    assert params == SamplingParams(seed=7, top_k=50, temperature=1.0, top_p=0.5, guidance_scale=3.0)
    assert type(params.seed) is int and type(params.top_k) is int and type(params.temperature) is float
    assert SamplingParams(seed=5.0).seed == 5  # integral floats (JSON numbers) are integers


def test_resolved_fills_model_defaults_and_checks_the_codebook(tiny):
    config = tiny.config
    resolved = SamplingParams(temperature=0.5).resolved(config)
    assert resolved.temperature == 0.5
    assert (resolved.top_k, resolved.top_p, resolved.guidance_scale) == (config.top_k, config.top_p,
                                                                         config.guidance_scale)
    assert resolved.negative_prompt == "" and 0 <= resolved.seed <= MAX_SEED
    assert SamplingParams(seed=3).resolved(config).seed == 3
    with pytest.raises(InvalidRequestError, match="top_k") as caught:
        SamplingParams(top_k=config.card + 1).resolved(config)
    assert caught.value.limit == f"0..{config.card}"


def test_job_defaults_fill_only_unset_fields_and_mappings_ignore_other_keys():
    job = SamplingParams(temperature=0.7, top_k=10, negative_prompt="noise")
    row = SamplingParams.from_mapping({"prompt": "x", "id": "r1", "top_k": 3, "seed": None})
    assert row.with_defaults(job) == SamplingParams(temperature=0.7, top_k=3, negative_prompt="noise")
    assert SamplingParams.from_mapping(row.to_dict()) == row
