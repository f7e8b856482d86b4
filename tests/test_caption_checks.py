"""The caption checks the demo model is judged by (audiogen.eval.caption_checks) on the held-out corpus clips
themselves: a check that failed its own reference clips could not tell a good model from a bad one."""

import numpy as np
import pytest

from audiogen.data import synth
from audiogen.eval.caption_checks import CHECKS, check, target

SR = synth.SAMPLE_RATE


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_every_heldout_reference_clip_passes_its_own_check(kind):
    for index in range(12):
        spec, caption = synth.item_spec(index, 0, "heldout", duration=5.0, kind=kind)
        result = check(spec, synth.render(spec, SR), SR)
        assert result["ok"], (caption, target(spec), result)


def test_a_wrong_clip_fails_and_silence_never_passes():
    low = synth.SoundSpec(kind="tone", note="c3", waveform="sine", duration=2.0)
    high = synth.SoundSpec(kind="tone", note="a5", waveform="sine", duration=2.0)
    assert not check(high, synth.render(low, SR), SR)["ok"]
    brown = synth.SoundSpec(kind="noise", color="brown", duration=2.0)
    white = synth.SoundSpec(kind="noise", color="white", duration=2.0)
    assert not check(white, synth.render(brown, SR), SR)["ok"]
    assert check(white, np.zeros(SR, np.float32), SR) == {"value": "silent", "ok": False}
    with pytest.raises(ValueError, match="siren"):
        check(synth.SoundSpec(kind="siren", note="a4", duration=1.0), np.ones(SR, np.float32), SR)
