"""Random masking and unmasking: the hash RNG, the torch reference, and the statistics of
both implementations (the C++ op must give the same ids; test_extension.py checks that)."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from masksc import masking
from masksc.errors import DataError
from masksc.masking import random_masking_torch, token_keys, unmask_torch

U64 = 1 << 64
IMPLS = {"torch": random_masking_torch, "cpp": masking.random_masking_cpp}


def mix64_exact(z):
    z %= U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % U64
    return z ^ (z >> 31)


def key_exact(seed, b, j):
    """csrc/hash_rng.h in exact Python integer arithmetic: the independent oracle."""
    seed_st = mix64_exact(seed + 0x9E3779B97F4A7C15)
    sample_st = mix64_exact(seed_st + (b + 1) * 0x9E3779B97F4A7C15)
    h = mix64_exact(sample_st + (j + 1) * 0xD1B54A32D192ED03)
    return (h & 0x7FFFFFFFFFFFFFFF & ~((1 << 20) - 1)) | j


def test_int64_arithmetic_wraps_mod_2_64():
    rng = np.random.default_rng(0)
    a = [int(x) for x in rng.integers(-(2**63), 2**63 - 1, size=200, dtype=np.int64)]
    b = [int(x) for x in rng.integers(-(2**63), 2**63 - 1, size=200, dtype=np.int64)]
    ta, tb = torch.tensor(a), torch.tensor(b)
    for got, op in (((ta * tb).tolist(), lambda x, y: x * y), ((ta + tb).tolist(), lambda x, y: x + y)):
        assert [g % U64 for g in got] == [op(x, y) % U64 for x, y in zip(a, b)]


@pytest.mark.parametrize("seed", [0, 1, -1, 2**63, 2**64 - 1, 987654321987])
def test_token_keys_match_exact_hash(seed):
    keys = token_keys(3, 7, seed)
    expected = [[key_exact(seed % U64, b, j) for j in range(7)] for b in range(3)]
    assert keys.tolist() == expected
    assert (keys >= 0).all() and len(set(keys.flatten().tolist())) == 21


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,G,D,U", [(5, 16, 3, 4), (2, 144, 8, 36), (3, 9, 2, 8)])
def test_masking_contract(impl, B, G, D, U):
    tokens = torch.randn(B, G, D)
    kept, ids_keep, ids_restore, mask = IMPLS[impl](tokens, U, 11)
    assert kept.shape == (B, U, D) and ids_keep.shape == (B, U) and ids_restore.shape == (B, G)
    assert ids_keep.dtype == ids_restore.dtype == torch.int64 and mask.dtype == torch.bool
    # the U tokens with the smallest keys, in ascending index order
    keys = token_keys(B, G, 11)
    expected = keys.argsort(dim=1)[:, :U].sort(dim=1).values
    assert torch.equal(ids_keep, expected)
    expected_mask = torch.ones(B, G, dtype=torch.bool)
    expected_mask.scatter_(1, ids_keep, False)
    assert torch.equal(mask, expected_mask)
    ids_masked = torch.stack([torch.nonzero(m).flatten() for m in mask])
    assert torch.equal(ids_restore, torch.cat([ids_keep, ids_masked], 1).argsort(1))
    assert torch.equal(kept, torch.stack([tokens[b, ids_keep[b]] for b in range(B)]))


@pytest.mark.parametrize("impl", IMPLS)
def test_mae_unshuffle_with_ids_restore(impl):
    """MAE's decoder: cat(kept, mask tokens) gathered by ids_restore == unmask."""
    tokens, token = torch.randn(4, 20, 6), torch.randn(6)
    kept, ids_keep, ids_restore, _ = IMPLS[impl](tokens, 5, 3)
    seq = torch.cat([kept, token.expand(4, 15, 6)], 1)
    unshuffled = seq.gather(1, ids_restore[:, :, None].expand(-1, -1, 6))
    assert torch.equal(unshuffled, unmask_torch(kept, token, ids_keep, 20))


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic_per_seed_and_seeds_differ(impl):
    tokens = torch.randn(8, 64, 2)
    first, again = IMPLS[impl](tokens, 16, 5), IMPLS[impl](tokens, 16, 5)
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    others = [IMPLS[impl](tokens, 16, s)[1] for s in (6, 7, 2**40)]
    assert all(not torch.equal(first[1], o) for o in others)


@pytest.mark.parametrize("impl", IMPLS)
def test_samples_independent(impl):
    """Rows of one batch differ, and masks of neighbouring samples (and of one sample under
    neighbouring seeds) are uncorrelated."""
    B, G, U = 4000, 16, 4
    tokens = torch.zeros(B, G, 1)
    m0 = IMPLS[impl](tokens, U, 0)[3].double()
    m1 = IMPLS[impl](tokens, U, 1)[3].double()
    assert len({tuple(r) for r in m0[:50].tolist()}) > 40  # 1820 subsets: few repeats
    bound = 5 / math.sqrt(B * G)
    for a, b in ((m0[:-1], m0[1:]), (m0, m1)):
        corr = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert abs(corr) < bound, corr


def chisquare_p(counts):
    counts = np.asarray(counts, dtype=float)
    return stats.chisquare(counts, np.full(len(counts), counts.sum() / len(counts))).pvalue


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_token_kept_with_probability_u_over_g(impl, seed):
    B, G, U = 3000, 10, 3
    kept_counts = (~IMPLS[impl](torch.zeros(B, G, 1), U, seed)[3]).sum(0).numpy()
    assert kept_counts.sum() == B * U
    assert chisquare_p(kept_counts) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", [0, 1])
def test_subsets_equally_likely(impl, seed):
    B, G, U = 6000, 5, 2  # C(5, 2) = 10 subsets, 600 expected each
    ids = IMPLS[impl](torch.zeros(B, G, 1), U, seed)[1]
    codes = (ids[:, 0] * G + ids[:, 1]).numpy()
    counts = np.array([np.sum(codes == a * G + b) for a in range(G) for b in range(a + 1, G)])
    assert counts.sum() == B
    assert chisquare_p(counts) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_uniform_across_seeds(impl):
    """A fixed sample under seeds 0..N-1 (the training loop's step seeds) is also uniform."""
    G, U = 6, 1
    firsts = [int(IMPLS[impl](torch.zeros(1, G, 1), U, s)[1][0, 0]) for s in range(1200)]
    assert chisquare_p(np.bincount(firsts, minlength=G)) > 1e-3


def test_chisquare_detects_bias():
    """The uniformity tests can fail: a sampler favouring token 0 slightly is rejected."""
    rng = np.random.default_rng(0)
    p = np.full(10, 0.098)
    p[0] = 1 - p[1:].sum()
    assert chisquare_p(np.bincount(rng.choice(10, size=9000, p=p), minlength=10)) < 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,G,U", [(3, 7, 0), (3, 7, 7), (1, 5, 2), (4, 1, 0), (4, 1, 1)])
def test_edge_sizes(impl, B, G, U):
    tokens = torch.randn(B, G, 3)
    kept, ids_keep, ids_restore, mask = IMPLS[impl](tokens, U, 9)
    assert kept.shape == (B, U, 3) and ids_keep.shape == (B, U)
    assert mask.sum().item() == B * (G - U)
    assert torch.equal(ids_restore, torch.cat([ids_keep, torch.nonzero(mask)[:, 1].view(B, G - U)], 1).argsort(1))
    assert torch.equal(unmask_torch(kept, torch.zeros(3), ids_keep, G), tokens * (~mask)[:, :, None])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_torch_reference_dtypes(dtype):
    tokens = torch.randn(2, 12, 4).to(dtype)
    kept, ids_keep, _, _ = random_masking_torch(tokens, 3, 1)
    assert kept.dtype == dtype
    assert torch.equal(kept, tokens.gather(1, ids_keep[:, :, None].expand(-1, -1, 4)))


def test_unmask_inverse_of_gather():
    tokens, token = torch.randn(3, 10, 4), torch.randn(4)
    kept, ids_keep, _, mask = random_masking_torch(tokens, 4, 2)
    full = unmask_torch(kept, token, ids_keep, 10)
    assert torch.equal(full[~mask], tokens[~mask])
    assert torch.equal(full[mask], token.expand(int(mask.sum()), 4))
    assert torch.equal(unmask_torch(kept, token.view(1, 1, 4), ids_keep, 10), full)


def test_torch_reference_gradients():
    tokens = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    token = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def fn(t, m):
        kept, ids_keep, _, _ = random_masking_torch(t, 4, 8)
        return unmask_torch(kept * 2, m, ids_keep, 9)

    assert torch.autograd.gradcheck(fn, (tokens, token))
    out = fn(tokens, token)
    out.backward(torch.ones_like(out))
    mask = random_masking_torch(tokens, 4, 8)[3]
    assert torch.equal(tokens.grad, 2.0 * (~mask)[:, :, None].double().expand(-1, -1, 3))
    assert torch.equal(token.grad, torch.full((3,), float(mask.sum()), dtype=torch.float64))


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_masking_inputs(impl):
    with pytest.raises(DataError, match=r"n_keep must be in \[0, G\]"):
        IMPLS[impl](torch.randn(2, 5, 3), 6, 0)
    with pytest.raises(DataError, match="n_keep"):
        IMPLS[impl](torch.randn(2, 5, 3), -1, 0)
    with pytest.raises(DataError, match="3-D"):
        IMPLS[impl](torch.randn(5, 3), 2, 0)
    for n_keep in (2.9, True, "2"):  # never truncated or read as a number
        with pytest.raises(DataError, match=r"n_keep must be an integer, got"):
            IMPLS[impl](torch.randn(2, 5, 3), n_keep, 0)
    for n_keep in (0, 2, 5):  # seed 1.9 gave seed 1's masks
        with pytest.raises(DataError, match=r"seed must be an integer, got 1\.9; fix: pass an int\.$"):
            IMPLS[impl](torch.randn(2, 5, 3), n_keep, 1.9)


@pytest.mark.parametrize("unmask", [unmask_torch, masking.unmask_cpp])
def test_bad_unmask_inputs(unmask):
    kept, ids = torch.randn(2, 3, 4), torch.tensor([[0, 1, 2], [1, 2, 3]])
    with pytest.raises(DataError, match="mask_token"):
        unmask(kept, torch.zeros(5), ids, 6)
    with pytest.raises(DataError, match="ids_keep"):
        unmask(kept, torch.zeros(4), ids.int(), 6)
    with pytest.raises(DataError, match="n_tokens"):
        unmask(kept, torch.zeros(4), ids, 2)
    with pytest.raises(DataError, match=r"one device, got kept on cpu, mask_token on cpu, ids_keep on meta"):
        unmask(kept, torch.zeros(4), ids.to("meta"), 6)  # not the fake kernel's uninitialised memory


def test_op_level_unmask_backward_refuses_mixed_devices():
    masking.load_extension()
    with pytest.raises(DataError, match="unmask_backward: all tensors must be on one device"):
        torch.ops.masksc.unmask_backward(torch.randn(2, 6, 4), torch.zeros(2, 3, dtype=torch.int64, device="meta"))
