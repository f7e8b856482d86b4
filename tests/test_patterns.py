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
    # stereo pairs share their delay
    assert torch.equal(seq[:, 0], torch.where(seq[:, 0] == 50, seq[:, 0], seq[:, 0]))
    assert (seq[:, 1, 1:11] == codes[:, 1]).all()


def test_target_mask_marks_real_frames_only():
    mask = target_mask(length=7, frames=4, delays=(0, 1, 2))
    # target at position p is the token at p+1: frame p - delay
    assert mask.tolist() == [
        [True, True, True, True, False, False, False],
        [False, True, True, True, True, False, False],
        [False, False, True, True, True, True, False],
    ]
