"""Tests for rlhf_lib.ppo.core: each function against a naive for-loop reference, plus hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lib.lm.sequences import (
    entropy_from_logits,
    first_true_indices,
    last_valid_index,
    logprobs_from_logits,
    sequence_lengths,
    truncate_after_eos,
)
from rlhf_lib.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    compute_rewards,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)

ATOL = 1e-5

# Right-padded mask with a full row, a padded row and a single-token row.
MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0],
    ],
    dtype=torch.bool,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64)


def random_mask(B: int, T: int, seed: int) -> torch.Tensor:
    """Random right-padded mask with lengths in [1, T]."""
    lengths = torch.randint(1, T + 1, (B,), generator=gen(seed))
    return torch.arange(T)[None, :] < lengths[:, None]


def poison(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """Copy of x with every invalid position replaced by `value`."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))


# ---------------------------------------------------------------------------- naive references


def naive_valid(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [v for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]


def naive_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    vals = naive_valid(x, mask)
    return sum(vals) / len(vals)


def naive_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool) -> float:
    vals = naive_valid(x, mask)
    mu = sum(vals) / len(vals)
    return sum((v - mu) ** 2 for v in vals) / (len(vals) - 1 if unbiased else len(vals))


def naive_truncate(rows: list[list[int]], eos: int, pad: int):
    out, masks, has = [], [], []
    for row in rows:
        seen = False
        r, m = [], []
        for tok in row:
            if seen:
                r.append(pad)
                m.append(False)
            else:
                r.append(tok)
                m.append(True)
                seen = tok == eos
        out.append(r)
        masks.append(m)
        has.append(eos in row)
    return out, masks, has


def naive_log_softmax_at(logits_row: list[float], tok: int, temperature: float) -> float:
    z = [v / temperature for v in logits_row]
    mx = max(z)
    lse = mx + math.log(sum(math.exp(v - mx) for v in z))
    return z[tok] - lse


def naive_entropy(logits_row: list[float], temperature: float) -> float:
    z = [v / temperature for v in logits_row]
    mx = max(z)
    exps = [math.exp(v - mx) for v in z]
    s = sum(exps)
    return -sum((e / s) * math.log(e / s) for e in exps)


def naive_rewards(scores, logprobs, ref, mask, kl_coef, estimator):
    B, T = logprobs.shape
    rewards = [[0.0] * T for _ in range(B)]
    for b in range(B):
        last = max(t for t in range(T) if mask[b, t])
        for t in range(T):
            if mask[b, t]:
                lp, rl = logprobs[b, t].item(), ref[b, t].item()
                kl = lp - rl if estimator == "k1" else math.exp(rl - lp) - 1 - (rl - lp)
                rewards[b][t] = -kl_coef * kl
        rewards[b][last] += scores[b].item()
    return torch.tensor(rewards, dtype=torch.float64)


def naive_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE on the compacted valid tokens of each row, V = 0 after the last one."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        r = [rewards[b, t].item() for t in idx]
        v = [values[b, t].item() for t in idx] + [0.0]
        for i in range(len(idx)):
            a = 0.0
            for k in range(i, len(idx)):
                delta = r[k] + gamma * v[k + 1] - v[k]
                a += (gamma * lam) ** (k - i) * delta
            adv[b][idx[i]] = a
    return torch.tensor(adv, dtype=torch.float64)


def naive_policy_loss(new, old, adv, mask, clip):
    losses, clipped, kls, ratios = [], [], [], []
    for n, o, a, m in zip(
        new.flatten().tolist(), old.flatten().tolist(), adv.flatten().tolist(), mask.flatten().tolist()
    ):
        if not m:
            continue
        ratio = math.exp(n - o)
        l1 = -a * ratio
        l2 = -a * min(max(ratio, 1 - clip), 1 + clip)
        losses.append(max(l1, l2))
        clipped.append(1.0 if l2 > l1 else 0.0)
        kls.append((n - o) ** 2)
        ratios.append(ratio)
    k = len(losses)
    return sum(losses) / k, sum(clipped) / k, 0.5 * sum(kls) / k, sum(ratios) / k


def naive_value_loss(new, old, ret, mask, clip):
    losses, clipped = [], []
    for n, o, r, m in zip(
        new.flatten().tolist(), old.flatten().tolist(), ret.flatten().tolist(), mask.flatten().tolist()
    ):
        if not m:
            continue
        vc = o + min(max(n - o, -clip), clip)
        l1, l2 = (n - r) ** 2, (vc - r) ** 2
        losses.append(max(l1, l2))
        clipped.append(1.0 if l2 > l1 else 0.0)
    return 0.5 * sum(losses) / len(losses), sum(clipped) / len(clipped)


# ---------------------------------------------------------------------------- masked statistics


@pytest.mark.parametrize("float_mask", [False, True])
def test_masked_mean_matches_naive(float_mask):
    x = randn(3, 5)
    mask = MASK.double() if float_mask else MASK
    assert masked_mean(x, mask).item() == pytest.approx(naive_mean(x, MASK), abs=ATOL)
    rows = masked_mean(x, mask, dim=1)
    for b in range(3):
        assert rows[b].item() == pytest.approx(naive_mean(x[b], MASK[b]), abs=ATOL)
    cols = masked_mean(x, mask, dim=0)
    for t in range(5):
        assert cols[t].item() == pytest.approx(naive_mean(x[:, t], MASK[:, t]), abs=ATOL)


def test_masked_mean_hand_value_and_padding_ignored():
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(13.0 / 3.0)
    for bad in (1e9, float("inf"), float("nan")):
        assert masked_mean(poison(x, mask, bad), mask).item() == pytest.approx(13.0 / 3.0)


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_naive(unbiased):
    for seed in range(3):
        x = randn(4, 6, seed=seed)
        mask = random_mask(4, 6, seed=seed + 10)
        got = masked_var(x, mask, unbiased=unbiased).item()
        assert got == pytest.approx(naive_var(x, mask, unbiased), abs=ATOL)
        assert masked_var(poison(x, mask, float("nan")), mask, unbiased=unbiased).item() == pytest.approx(got)


def test_masked_var_hand_value_and_errors():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, False]])
    assert masked_var(x, mask, unbiased=True).item() == pytest.approx(2.0)  # ((1-2)^2+(3-2)^2)/1
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(1.0)
    one = torch.tensor([[True, False, False]])
    with pytest.raises(ValueError, match="at least 2 valid"):
        masked_var(x, one, unbiased=True)
    assert masked_var(x, one, unbiased=False).item() == 0.0
    with pytest.raises(ValueError):
        masked_var(x, torch.zeros_like(mask), unbiased=False)


def test_masked_whiten_statistics_and_padding():
    x = randn(4, 7, seed=3) * 5 + 2
    mask = random_mask(4, 7, seed=4)
    mask[0] = True  # make sure there are plenty of valid entries
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(w[~mask] == 0)
    # naive reference
    mu, sd = naive_mean(x, mask), math.sqrt(naive_var(x, mask, True) + 1e-8)
    for b in range(4):
        for t in range(7):
            expected = (x[b, t].item() - mu) / sd if mask[b, t] else 0.0
            assert w[b, t].item() == pytest.approx(expected, abs=ATOL)
    # padded values do not matter
    for bad in (1e6, -3.0, float("nan")):
        assert torch.equal(masked_whiten(poison(x, mask, bad), mask), w)
    # shift_mean=False keeps the original mean and still has unit variance
    w2 = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(w2, mask).item() == pytest.approx(mu, abs=1e-6)
    assert masked_var(w2, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(w2[~mask] == 0)


# ---------------------------------------------------------------------------- response masks


def test_first_true_indices_hand_and_random():
    bools = torch.tensor(
        [
            [False, True, False, True],
            [False, False, False, False],
            [True, True, True, True],
            [False, False, False, True],
        ]
    )
    assert first_true_indices(bools).tolist() == [1, 4, 0, 3]
    rnd = torch.rand(20, 9, generator=gen(5)) < 0.15
    expected = [next((t for t, v in enumerate(row) if v), 9) for row in rnd.tolist()]
    assert first_true_indices(rnd).tolist() == expected


def test_truncate_after_eos_hand():
    eos, pad = 2, 0
    responses = torch.tensor(
        [
            [5, 2, 7, 8],  # EOS in the middle
            [5, 6, 7, 8],  # no EOS
            [2, 9, 9, 9],  # EOS first
            [5, 6, 7, 2],  # EOS last
            [4, 2, 2, 3],  # several EOS
        ]
    )
    out, mask, has = truncate_after_eos(responses, eos, pad)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [5, 6, 7, 2], [4, 2, 0, 0]]
    assert mask.dtype == torch.bool
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert has.tolist() == [True, False, True, True, True]
    # single-token responses
    out1, mask1, has1 = truncate_after_eos(torch.tensor([[2], [7]]), eos, pad)
    assert out1.tolist() == [[2], [7]] and mask1.tolist() == [[True], [True]] and has1.tolist() == [True, False]


def test_truncate_after_eos_random_and_pad_equals_eos():
    rnd = torch.randint(0, 6, (30, 8), generator=gen(6))
    for eos, pad in [(1, 0), (3, 3)]:
        out, mask, has = truncate_after_eos(rnd, eos, pad)
        e_out, e_mask, e_has = naive_truncate(rnd.tolist(), eos, pad)
        assert out.tolist() == e_out
        assert mask.tolist() == e_mask
        assert has.tolist() == e_has


def test_sequence_lengths_and_last_valid_index():
    assert sequence_lengths(MASK).tolist() == [5, 3, 1]
    assert last_valid_index(MASK).tolist() == [4, 2, 0]
    assert sequence_lengths(MASK.float()).tolist() == [5, 3, 1]
    assert last_valid_index(MASK.float()).tolist() == [4, 2, 0]
    odd = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    assert sequence_lengths(odd).tolist() == [2, 0, 1]
    assert last_valid_index(odd).tolist() == [3, -1, 0]


# ---------------------------------------------------------------------------- log-probs, entropy, KL


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_from_logits_matches_naive(temperature):
    logits = torch.randn(2, 3, 6, generator=gen(7)) * 3
    tokens = torch.randint(0, 6, (2, 3), generator=gen(8))
    lp = logprobs_from_logits(logits, tokens, temperature)
    assert lp.shape == (2, 3) and lp.dtype == torch.float32
    for b in range(2):
        for t in range(3):
            expected = naive_log_softmax_at(logits[b, t].tolist(), tokens[b, t].item(), temperature)
            assert lp[b, t].item() == pytest.approx(expected, abs=1e-5)


def test_logprobs_from_logits_hand_and_low_precision():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # probs 1/4, 3/4
    assert logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    assert logprobs_from_logits(logits, torch.tensor([[0]]), temperature=0.5).item() == pytest.approx(math.log(0.1))
    # bf16 input is upcast: result equals the float32 computation on the rounded logits
    logits16 = (torch.randn(2, 4, 50, generator=gen(9)) * 4).bfloat16()
    tokens = torch.randint(0, 50, (2, 4), generator=gen(10))
    lp16 = logprobs_from_logits(logits16, tokens)
    assert lp16.dtype == torch.float32
    torch.testing.assert_close(lp16, logprobs_from_logits(logits16.float(), tokens))
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, torch.tensor([[0]]), temperature=0.0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_entropy_from_logits(temperature):
    logits = torch.randn(2, 3, 5, generator=gen(11)) * 2
    ent = entropy_from_logits(logits, temperature)
    assert ent.shape == (2, 3) and ent.dtype == torch.float32
    for b in range(2):
        for t in range(3):
            assert ent[b, t].item() == pytest.approx(naive_entropy(logits[b, t].tolist(), temperature), abs=1e-5)
    uniform = torch.zeros(1, 2, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((1, 2), math.log(8.0)))


def test_kl_penalty_values():
    lp = randn(3, 4, seed=12)
    ref = randn(3, 4, seed=13)
    k1 = kl_penalty(lp, ref, "k1")
    k3 = kl_penalty(lp, ref, "k3")
    for b in range(3):
        for t in range(4):
            d = ref[b, t].item() - lp[b, t].item()
            assert k1[b, t].item() == pytest.approx(-d, abs=1e-9)
            assert k3[b, t].item() == pytest.approx(math.exp(d) - 1 - d, abs=1e-9)
    assert torch.equal(kl_penalty(lp, ref), k1)  # default is k1
    # hand value: p = 1, q = 2 (log-space 0, log 2)
    zero, log2 = torch.tensor([0.0]), torch.tensor([math.log(2.0)])
    assert kl_penalty(zero, log2, "k1").item() == pytest.approx(-math.log(2.0))
    assert kl_penalty(zero, log2, "k3").item() == pytest.approx(1.0 - math.log(2.0))


def test_kl_penalty_identical_is_zero_and_k3_nonnegative():
    lp = torch.randn(50, 20, generator=gen(14)) * 5 - 3
    assert torch.all(kl_penalty(lp, lp, "k1") == 0)
    assert torch.all(kl_penalty(lp, lp, "k3") == 0)
    for scale in (1e-6, 1e-3, 1.0, 10.0):
        ref = lp + torch.randn(50, 20, generator=gen(15)) * scale
        assert torch.all(kl_penalty(lp, ref, "k3") >= 0)
        assert torch.all(kl_penalty(lp.double(), ref.double(), "k3") >= 0)


def test_kl_penalty_unknown_estimator():
    with pytest.raises(ValueError, match=r"k1.*k3"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k2")


# ---------------------------------------------------------------------------- rewards and GAE


def test_compute_rewards_hand():
    scores = torch.tensor([1.0, -2.0, 0.5])
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -1.0, -1.0], [-1.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    rewards, nsr, kl = compute_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -0.5], [0.0, -1.0, 0.0], [0.5, 0.0, 0.0]]))
    torch.testing.assert_close(nsr, torch.tensor([[-0.05, 0.0, 0.05], [0.0, 0.1, 0.0], [-0.05, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 1.05], [0.0, -1.9, 0.0], [0.45, 0.0, 0.0]]))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_compute_rewards_matches_naive(estimator):
    B, T = 6, 7
    mask = random_mask(B, T, seed=16)
    scores = randn(B, seed=17)
    lp, ref = randn(B, T, seed=18), randn(B, T, seed=19)
    rewards, nsr, kl = compute_rewards(scores, lp, ref, mask.float(), 0.05, estimator)
    expected = naive_rewards(scores, lp, ref, mask, 0.05, estimator)
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(nsr, -0.05 * kl)
    assert torch.all(kl[~mask] == 0) and torch.all(rewards[~mask] == 0)
    # the whole score lands in the row: sum(rewards) = score + sum(non-score rewards)
    torch.testing.assert_close(rewards.sum(1), scores + nsr.sum(1))
    # padding content is irrelevant
    r2, _, _ = compute_rewards(scores, poison(lp, mask, float("nan")), poison(ref, mask, 1e4), mask, 0.05, estimator)
    torch.testing.assert_close(r2, rewards)


def test_compute_gae_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # gamma = lam = 1: advantage = reward-to-go - value
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[6.0 - 0.5, 5.0 - 1.0, 3.0 - 1.5]]))
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0]]))
    # lam = 0: advantage = one-step TD error, V = 0 after the last token
    adv0, _ = compute_gae(rewards, values, mask, gamma=0.9, lam=0.0)
    torch.testing.assert_close(adv0, torch.tensor([[1.0 + 0.9 * 1.0 - 0.5, 2.0 + 0.9 * 1.5 - 1.0, 3.0 - 1.5]]))
    # gamma = 0.5, lam = 0.5 by hand: deltas = [1 + 0.5 - 0.5, 2 + 0.75 - 1, 3 - 1.5] = [1.0, 1.75, 1.5]
    adv_h, _ = compute_gae(rewards, values, mask, gamma=0.5, lam=0.5)
    a2 = 1.5
    a1 = 1.75 + 0.25 * a2
    a0 = 1.0 + 0.25 * a1
    torch.testing.assert_close(adv_h, torch.tensor([[a0, a1, a2]]))


def test_compute_gae_reward_to_go_with_padding():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 5.0, 99.0, 99.0], [7.0, 99.0, 99.0, 99.0]])
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 3.0, 99.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[9.0, 8.0, 6.0, 3.0], [3.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[10.0, 9.0, 7.0, 4.0], [5.0, 5.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_compute_gae_matches_naive(gamma, lam):
    B, T = 5, 8
    mask = random_mask(B, T, seed=20)
    rewards, values = randn(B, T, seed=21), randn(B, T, seed=22)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, naive_gae(rewards, values, mask, gamma, lam))
    torch.testing.assert_close(ret, torch.where(mask, adv + values, 0.0))
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)
    # garbage in padding never leaks into valid positions
    adv2, ret2 = compute_gae(
        poison(rewards, mask, float("nan")), poison(values, mask, float("inf")), mask.float(), gamma, lam
    )
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)


def test_compute_gae_non_prefix_mask_equals_compacted():
    rewards, values = randn(1, 4, seed=23), randn(1, 4, seed=24)
    right = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    left_r = torch.cat([torch.zeros(1, 1, dtype=torch.float64), rewards[:, :3]], 1)
    left_v = torch.cat([torch.full((1, 1), 123.0, dtype=torch.float64), values[:, :3]], 1)
    left = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    adv_r, _ = compute_gae(rewards, values, right, 0.95, 0.9)
    adv_l, _ = compute_gae(left_r, left_v, left, 0.95, 0.9)
    torch.testing.assert_close(adv_l[:, 1:], adv_r[:, :3])
    assert adv_l[0, 0] == 0
    # holes in the middle are skipped: same as the naive GAE on the compacted valid tokens
    holes = torch.rand(6, 7, generator=gen(35)) < 0.6
    holes[:, 0] = True
    r, v = randn(6, 7, seed=36), randn(6, 7, seed=37)
    adv_h, _ = compute_gae(r, poison(v, holes, 50.0), holes, 0.9, 0.8)
    torch.testing.assert_close(adv_h, naive_gae(r, v, holes, 0.9, 0.8))


# ---------------------------------------------------------------------------- losses


def test_policy_loss_ratio_one():
    adv = randn(3, 5, seed=25)
    lp = randn(3, 5, seed=26)
    out = policy_loss(lp, lp.clone(), adv, MASK, cliprange=0.2)
    assert out["clipfrac"].item() == 0.0
    assert out["approxkl"].item() == 0.0
    assert out["ratio"].item() == pytest.approx(1.0)
    assert out["loss"].item() == pytest.approx(-naive_mean(adv, MASK), abs=1e-9)


def test_policy_loss_hand_clipping():
    c = 0.2
    new = torch.tensor([[math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5), 0.0]])
    old = torch.zeros(1, 5)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    out = policy_loss(new, old, adv, mask, c)
    # per token: max(-A r, -A clip(r)) = [-1.2 (clipped), 1.5, -0.5, 0.8 (clipped)]
    assert out["loss"].item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    assert out["clipfrac"].item() == pytest.approx(0.5)
    assert out["ratio"].item() == pytest.approx((1.5 + 1.5 + 0.5 + 0.5) / 4)
    expected_kl = 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4
    assert out["approxkl"].item() == pytest.approx(expected_kl)


def test_policy_loss_matches_naive_and_gradients():
    B, T = 4, 6
    mask = random_mask(B, T, seed=27)
    old = randn(B, T, seed=28)
    new = (old + 0.3 * randn(B, T, seed=29)).requires_grad_(True)
    adv = randn(B, T, seed=30)
    out = policy_loss(new, old, adv, mask, 0.1)
    e_loss, e_clip, e_kl, e_ratio = naive_policy_loss(new.detach(), old, adv, mask, 0.1)
    assert out["loss"].item() == pytest.approx(e_loss, abs=1e-9)
    assert out["clipfrac"].item() == pytest.approx(e_clip, abs=1e-6)  # float32 indicator, as in TRL
    assert out["approxkl"].item() == pytest.approx(e_kl, abs=1e-9)
    assert out["ratio"].item() == pytest.approx(e_ratio, abs=1e-9)
    assert 0 < e_clip < 1  # the case exercises both branches
    for key in ("clipfrac", "approxkl", "ratio"):
        assert not out[key].requires_grad
    out["loss"].backward()
    assert torch.all(new.grad[~mask] == 0) and torch.all(torch.isfinite(new.grad))
    # garbage (-inf / nan) in padded log-probs gives the same loss and finite gradients
    new_bad = poison(new.detach(), mask, float("-inf")).requires_grad_(True)
    out_bad = policy_loss(new_bad, poison(old, mask, float("nan")), poison(adv, mask, 1e30), mask, 0.1)
    assert out_bad["loss"].item() == pytest.approx(out["loss"].item(), abs=1e-12)
    out_bad["loss"].backward()
    assert torch.all(torch.isfinite(new_bad.grad))
    torch.testing.assert_close(new_bad.grad, new.grad)


def test_value_loss_hand():
    c = 0.2
    new = torch.tensor([[1.0, 0.5, 2.0, 7.0]])
    old = torch.tensor([[0.5, 0.5, 1.0, 0.0]])
    ret = torch.tensor([[0.0, 1.0, 2.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    out = value_loss(new, old, ret, mask, c)
    # tok0: (1-0)^2=1 vs clipped 0.7: 0.49 -> 1 (not clipped)
    # tok1: (0.5-1)^2=0.25 vs same -> 0.25 (not clipped)
    # tok2: (2-2)^2=0 vs clipped 1.2: 0.64 -> 0.64 (clipped)
    assert out["loss"].item() == pytest.approx(0.5 * (1.0 + 0.25 + 0.64) / 3)
    assert out["clipfrac"].item() == pytest.approx(1 / 3)


def test_value_loss_matches_naive_and_padding():
    B, T = 4, 6
    mask = random_mask(B, T, seed=31)
    old, ret = randn(B, T, seed=32), randn(B, T, seed=33)
    new = (old + 0.5 * randn(B, T, seed=34)).requires_grad_(True)
    out = value_loss(new, old, ret, mask, 0.2)
    e_loss, e_clip = naive_value_loss(new.detach(), old, ret, mask, 0.2)
    assert out["loss"].item() == pytest.approx(e_loss, abs=1e-9)
    assert out["clipfrac"].item() == pytest.approx(e_clip, abs=1e-6)  # float32 indicator, as in TRL
    assert 0 < e_clip < 1
    out["loss"].backward()
    assert torch.all(new.grad[~mask] == 0)
    new_bad = poison(new.detach(), mask, float("nan")).requires_grad_(True)
    out_bad = value_loss(new_bad, poison(old, mask, float("inf")), poison(ret, mask, float("nan")), mask, 0.2)
    assert out_bad["loss"].item() == pytest.approx(out["loss"].item(), abs=1e-12)
    out_bad["loss"].backward()
    torch.testing.assert_close(new_bad.grad, new.grad)


# ---------------------------------------------------------------------------- KL controllers


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 64)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_controller_direction_and_values():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=7.2, n_steps=256)  # error = 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    before = ctl.value
    ctl.update(current_kl=60.0, n_steps=256)  # clipped at +0.2
    assert ctl.value == pytest.approx(before * (1 + 0.2 * 256 / 10000))
    assert ctl.value > before
    before = ctl.value
    ctl.update(current_kl=5.4, n_steps=100)  # error = -0.1
    assert ctl.value == pytest.approx(before * (1 - 0.1 * 100 / 10000))
    assert ctl.value < before
    before = ctl.value
    ctl.update(current_kl=0.0, n_steps=100)  # clipped at -0.2
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 100 / 10000))
    before = ctl.value
    ctl.update(current_kl=6.0, n_steps=100)  # on target
    assert ctl.value == pytest.approx(before)
    ctl.update(current_kl=torch.tensor(7.2), n_steps=1)  # a 0-dim tensor is accepted
    assert isinstance(ctl.value, float)


def test_adaptive_kl_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.2, target=3.0, horizon=500)
    ctl.update(5.0, 50)
    state = ctl.state_dict()
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    ctl.update(1.0, 20)
    restored.update(1.0, 20)
    assert restored.value == ctl.value
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
