import torch

from audiogen.patterns import build_delay_pattern, revert_delay_pattern, target_mask


def test_delay_pattern_layout_matches_audiocraft():
    # audiocraft's DelayedPatternProvider: step 0 is empty, step t holds frame t-1-delay of each codebook.
    codes = torch.arange(1, 13).view(1, 3, 4)  # 3 codebooks x 4 frames, ids 1..12
    seq = build_delay_pattern(codes, (0, 1, 2), special=99)
    assert seq.shape == (1, 3, 4 + 2 + 1)
    assert seq[0].tolist() == [
        [99, 1, 2, 3, 4, 99, 99],
        [99, 99, 5, 6, 7, 8, 99],
        [99, 99, 99, 9, 10, 11, 12],
    ]


def test_revert_inverts_build_for_stereo_delays():
    codes = torch.randint(0, 50, (2, 8, 10))
    delays = (0, 0, 1, 1, 2, 2, 3, 3)
    seq = build_delay_pattern(codes, delays, special=50)
    assert torch.equal(revert_delay_pattern(seq, delays, 10), codes)
    # the special token stands exactly where no frame is (position p of codebook k holds frame p - 1 - delay;
    # codes are < 50), and stereo pairs share it
    frame = torch.arange(seq.shape[-1])[None, :] - 1 - torch.tensor(delays)[:, None]
    valid = (frame >= 0) & (frame < 10)
    assert torch.equal(seq != 50, valid.expand_as(seq))
    assert all(torch.equal(valid[k], valid[k + 1]) for k in range(0, 8, 2))
    assert valid.sum(-1).tolist() == [10] * 8 and (seq[:, 1, 1:11] == codes[:, 1]).all()
    # the training mask is the same validity one position later (position p is scored on the token of p + 1)
    assert torch.equal(target_mask(seq.shape[-1] - 1, 10, delays), valid[:, 1:])


def test_target_mask_marks_real_frames_only():
    mask = target_mask(length=7, frames=4, delays=(0, 1, 2))
    # target at position p is the token at p+1: frame p - delay
    assert mask.tolist() == [
        [True, True, True, True, False, False, False],
        [False, True, True, True, True, False, False],
        [False, False, True, True, True, True, False],
    ]
