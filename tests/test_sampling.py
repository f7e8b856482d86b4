import torch

from audiogen.sampling import (apply_guidance, sample_tokens, sampling_plan, seed_key, stream_keys,
                               uniform_noise)


def _sample(logits, seed=1, temperature=1.0, top_k=0, top_p=0.0, frames=None):
    rows, books, vocab = logits.shape
    frames = torch.zeros((rows, books), dtype=torch.long) if frames is None else frames
    t = torch.full((rows,), float(temperature))
    k = torch.full((rows,), top_k, dtype=torch.long)
    p = torch.full((rows,), float(top_p))
    n, ranked = sampling_plan(t.tolist(), k.tolist(), p.tolist(), vocab)
    keys = stream_keys(torch.full((rows,), seed_key(seed), dtype=torch.long), frames)
    return sample_tokens(logits, keys=keys, temperature=t, top_k=k, top_p=p, num_candidates=n, ranked=ranked)


def test_greedy_and_top_k_one_pick_the_argmax():
    logits = torch.randn(5, 4, 300)
    greedy = _sample(logits, temperature=0.0)
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.equal(_sample(logits, top_k=1, seed=7), greedy)


def test_top_k_only_returns_top_candidates():
    logits = torch.randn(64, 4, 100)
    allowed = logits.topk(5, dim=-1).indices
    frames = torch.arange(64)[:, None].expand(64, 4).contiguous()
    picked = _sample(logits, top_k=5, frames=frames)
    assert (allowed == picked[..., None]).any(-1).all()


def test_top_p_cuts_the_tail():
    # one dominant token holding 90% of the mass: top_p=0.5 must always choose it
    logits = torch.full((32, 2, 50), -5.0)
    logits[..., 3] = 5.0
    frames = torch.arange(32)[:, None].expand(32, 2).contiguous()
    assert (_sample(logits, top_p=0.5, frames=frames) == 3).all()
    # top_p=1.0 keeps everything: with a flat distribution we see many different tokens
    flat = torch.zeros((64, 1, 50))
    assert len(set(_sample(flat, top_p=1.0, frames=torch.arange(64)[:, None]).flatten().tolist())) > 20


def test_sampling_matches_softmax_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))[None, None].expand(1, 1, 3)
    counts = torch.zeros(3)
    for frame in range(6000):
        token = _sample(logits.contiguous(), seed=3, frames=torch.tensor([[frame]]))
        counts[token.item()] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_noise_is_uniform_and_independent_of_row_position():
    keys = stream_keys(torch.tensor([seed_key(11), seed_key(12)]), torch.tensor([[0, 0], [5, 5]]))
    u = uniform_noise(keys, torch.arange(4096).expand(2, 2, 4096))
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    # row order does not matter: the key depends on (seed, frame, codebook) only
    swapped = stream_keys(torch.tensor([seed_key(12), seed_key(11)]), torch.tensor([[5, 5], [0, 0]]))
    assert torch.equal(swapped.flip(0), keys)
    # codebooks and frames get different streams
    assert keys[0, 0] != keys[0, 1] and keys[0, 0] != keys[1, 0]


def test_large_seeds_use_all_63_bits():
    assert seed_key(1) != seed_key(1 + 2**40)
    assert len({seed_key(s) for s in range(10_000)}) > 9_990


def test_unranked_full_vocabulary_equals_ranked_sampling():
    """Skipping the sort when every token is a candidate must not change the draw."""
    logits = torch.randn(8, 4, 64)
    keys = stream_keys(torch.full((8,), seed_key(5), dtype=torch.long), torch.zeros((8, 4), dtype=torch.long))
    params = dict(keys=keys, temperature=torch.ones(8), top_k=torch.zeros(8, dtype=torch.long),
                  top_p=torch.zeros(8), num_candidates=64)
    assert torch.equal(sample_tokens(logits, ranked=False, **params), sample_tokens(logits, ranked=True, **params))
    assert sampling_plan([1.0, 1.0], [0, 64], [0.0, 0.0], 64) == (64, False)
    assert sampling_plan([1.0, 0.0], [0, 0], [0.0, 0.0], 64) == (64, True)
    assert sampling_plan([1.0, 1.0], [5, 9], [0.0, 0.0], 64) == (9, True)
    assert sampling_plan([0.0], [250], [0.0], 2048) == (1, True)


def test_guidance_mix():
    cond, uncond = torch.randn(3, 4, 10), torch.randn(3, 4, 10)
    mixed = apply_guidance(torch.stack([cond, uncond], 1), torch.tensor([1.0, 3.0, 0.0]))
    assert torch.allclose(mixed[0], cond[0], atol=1e-6)
    assert torch.allclose(mixed[1], uncond[1] + 3 * (cond[1] - uncond[1]))
    assert torch.allclose(mixed[2], uncond[2])
