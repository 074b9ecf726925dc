"""Unit tests of the online-RL toolkit (align.rl) and the built-in advantage estimators.

Pure tensor arithmetic against references computed by hand or by plain Python loops written here, plus
a tiny Llama (built at test time, no files) for the forward passes and the scorer. Runs in seconds.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from align import AlignError
from align.reward import RewardFunction
from align.rl.advantages import AdvantageInputs, group_reduce
from align.rl.batch import RolloutBatch
from align.rl.forward import (
    PolicyAndValue,
    Reference,
    entropy_of,
    logprobs_of,
    policy_logprobs,
    response_logits,
    reward_scores,
)
from align.rl.kl import AdaptiveKL, FixedKL, kl_per_token
from align.rl.loss import Totals, aggregate, kl_loss, policy_loss, value_loss
from align.rl.prompts import Prompt, PromptSampler
from align.rl.scoring import Scorer
from align.schema import build
from align.sequences import token_values

# ------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pm():
    from align.plugin_manager import get_plugin_manager

    return get_plugin_manager()


def estimate(pm, name, inputs, options=None):
    estimator = pm.get("advantage estimator", name)
    config = build(estimator.Config, options or {}, "x")
    return estimator.estimate(inputs, config)


def close(actual, expected, atol=1e-6, rtol=0.0):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (actual, expected)


def per_token(values, lengths, width):
    """Each row's value on its first ``length`` tokens, 0 after."""
    return [[v if t < n else 0.0 for t in range(width)] for v, n in zip(values, lengths, strict=True)]


def mask_of(lengths, width):
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(width)] for n in lengths])


# Two groups of three responses, ragged. Padding holds junk (9.0) that a masked computation must ignore.
LENGTHS = [4, 2, 3, 1, 4, 2]
GROUPS = [0, 0, 0, 1, 1, 1]
TOKEN_REWARDS = [
    [-0.5, 0.0, -0.5, 2.0],  # 1.0
    [0.0, 2.0, 9.0, 9.0],  # 2.0
    [-1.0, 0.0, 5.0, 9.0],  # 4.0
    [3.0, 9.0, 9.0, 9.0],  # 3.0
    [0.25, -0.25, 0.0, -1.0],  # -1.0
    [0.5, 1.5, 9.0, 9.0],  # 2.0
]
REWARDS = [1.0, 2.0, 4.0, 3.0, -1.0, 2.0]


def inputs_of(token_rewards=TOKEN_REWARDS, lengths=LENGTHS, groups=GROUPS, values=None, gamma=1.0, lam=1.0):
    width = len(token_rewards[0])
    return AdvantageInputs(
        token_rewards=torch.tensor(token_rewards),
        mask=mask_of(lengths, width),
        groups=torch.tensor(groups),
        values=None if values is None else torch.tensor(values),
        gamma=gamma,
        lam=lam,
    )


# ------------------------------------------------------------------------------ advantage estimators


def test_sequence_rewards_are_the_score_minus_the_summed_kl_penalty():
    # score at the last token, a KL penalty on every token; junk on padding is not counted
    scores, penalties = [2.0, -1.0], [[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]]
    token_rewards = [[-0.1, -0.2, 2.0 - 0.3], [-1.0 - 0.5, 7.0, 7.0]]
    inputs = inputs_of(token_rewards, lengths=[3, 1], groups=[0, 0])
    close(inputs.sequence_rewards, [scores[0] - sum(penalties[0]), scores[1] - sum(penalties[1])])
    close(inputs.per_token(torch.tensor([3.0, -2.0])), [[3.0, 3.0, 3.0], [-2.0, 0.0, 0.0]])


def test_grpo_group_scaled(pm):
    advantages, returns = estimate(pm, "grpo", inputs_of())
    assert returns is None
    # group 0: rewards 1, 2, 4: mean 7/3, unbiased variance (16/9 + 1/9 + 25/9) / 2 = 7/3
    # group 1: rewards 3, -1, 2: mean 4/3, unbiased variance (25/9 + 49/9 + 4/9) / 2 = 13/3
    s0, s1 = math.sqrt(7 / 3) + 1e-4, math.sqrt(13 / 3) + 1e-4
    expected = [(1 - 7 / 3) / s0, (2 - 7 / 3) / s0, (4 - 7 / 3) / s0, (3 - 4 / 3) / s1, (-1 - 4 / 3) / s1]
    expected.append((2 - 4 / 3) / s1)
    close(advantages, per_token(expected, LENGTHS, 4))
    # the default is the explicit "group"
    close(estimate(pm, "grpo", inputs_of(), {"scale_rewards": "group"})[0], advantages)


def test_grpo_no_scaling_is_dr_grpo(pm):
    advantages, _ = estimate(pm, "grpo", inputs_of(), {"scale_rewards": "none"})
    expected = [1 - 7 / 3, 2 - 7 / 3, 4 - 7 / 3, 3 - 4 / 3, -1 - 4 / 3, 2 - 4 / 3]
    close(advantages, per_token(expected, LENGTHS, 4))


def test_grpo_batch_scaled(pm):
    advantages, _ = estimate(pm, "grpo", inputs_of(), {"scale_rewards": "batch"})
    batch_std = statistics.stdev(REWARDS)  # unbiased, over all six responses
    means = [7 / 3] * 3 + [4 / 3] * 3
    expected = [(r - m) / (batch_std + 1e-4) for r, m in zip(REWARDS, means, strict=True)]
    close(advantages, per_token(expected, LENGTHS, 4))


def test_grpo_epsilon_option(pm):
    advantages, _ = estimate(pm, "grpo", inputs_of(), {"epsilon": 0.5})
    s0 = math.sqrt(7 / 3) + 0.5
    assert advantages[0, 0].item() == pytest.approx((1 - 7 / 3) / s0, abs=1e-6)


def test_grpo_uniform_group_gets_zero(pm):
    token_rewards = [row[:] for row in TOKEN_REWARDS]
    for row, n in zip(token_rewards[3:], LENGTHS[3:], strict=True):  # group 1: every reward 0.5
        row[:n] = [0.0] * (n - 1) + [0.5]
    for scale in ("group", "batch", "none"):
        advantages, _ = estimate(pm, "grpo", inputs_of(token_rewards), {"scale_rewards": scale})
        assert torch.isfinite(advantages).all()
        assert torch.equal(advantages[3:], torch.zeros(3, 4)), scale
        assert advantages[:3].abs().sum() > 0


def test_rloo_leave_one_out(pm):
    advantages, returns = estimate(pm, "rloo", inputs_of())
    assert returns is None
    # r_i - mean of the two others
    expected = [1 - (2 + 4) / 2, 2 - (1 + 4) / 2, 4 - (1 + 2) / 2, 3 - (-1 + 2) / 2, -1 - (3 + 2) / 2, 2 - (3 - 1) / 2]
    assert expected == [-2.0, -0.5, 2.5, 2.5, -3.5, 1.0]
    close(advantages, per_token(expected, LENGTHS, 4))
    first_tokens = advantages[:, 0]
    assert first_tokens[:3].sum().item() == pytest.approx(0, abs=1e-6)
    assert first_tokens[3:].sum().item() == pytest.approx(0, abs=1e-6)


def test_reinforce_pp_discounted_then_whitened(pm):
    gamma = 0.9
    advantages, returns = estimate(pm, "reinforce_pp", inputs_of(gamma=gamma, lam=0.3))
    assert returns is None
    # reward-to-go per token, within each response only (the padding junk is never reached)
    to_go = []
    for row, n in zip(TOKEN_REWARDS, LENGTHS, strict=True):
        out, running = [0.0] * 4, 0.0
        for t in range(n - 1, -1, -1):
            running = row[t] + gamma * running
            out[t] = running
        to_go.append(out)
    # by hand for row 0: [-0.5 + .9(0 + .9(-0.5 + .9*2)), 0 + .9(-0.5 + .9*2), -0.5 + .9*2, 2]
    assert to_go[0] == pytest.approx([-0.5 + 0.9 * 0.9 * 1.3, 0.9 * 1.3, 1.3, 2.0])
    flat = [to_go[i][t] for i in range(6) for t in range(LENGTHS[i])]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)
    expected = [
        [(to_go[i][t] - mean) / math.sqrt(var + 1e-8) if t < LENGTHS[i] else 0.0 for t in range(4)] for i in range(6)
    ]
    close(advantages, expected, atol=1e-5)
    live = advantages[mask_of(LENGTHS, 4).bool()]
    assert live.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert live.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-5)


def gae_by_hand(rewards, values, lengths, gamma, lam):
    advantages = []
    for r, v, n in zip(rewards, values, lengths, strict=True):
        out, running = [0.0] * len(r), 0.0
        for t in range(n - 1, -1, -1):
            next_value = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * next_value - v[t] + gamma * lam * running
            out[t] = running
        advantages.append(out)
    return advantages


def test_gae_by_hand(pm):
    gamma, lam = 0.9, 0.8
    rewards = [[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]]  # row 1 ends after two tokens: 5.0 is padding
    values = [[0.1, 0.2, 0.3], [0.5, 0.2, 100.0]]  # 100 is past the end of row 1: must not leak
    inputs = inputs_of(rewards, lengths=[3, 2], groups=[0, 1], values=values, gamma=gamma, lam=lam)
    advantages, returns = estimate(pm, "gae", inputs)
    # row 1 by hand: t=1: δ = 1 + 0.9·0 - 0.2 = 0.8; t=0: δ = 0 + 0.9·0.2 - 0.5 = -0.32, A = -0.32 + 0.72·0.8
    assert advantages[1].tolist() == pytest.approx([0.256, 0.8, 0.0], abs=1e-6)
    assert returns[1].tolist() == pytest.approx([0.756, 1.0, 0.0], abs=1e-6)
    # row 0 by hand: t=2: δ = 1 - 0.3 = 0.7; t=1: δ = 0.9·0.3 - 0.2 = 0.07, A = 0.07 + 0.72·0.7 = 0.574;
    # t=0: δ = 0.9·0.2 - 0.1 = 0.08, A = 0.08 + 0.72·0.574 = 0.49328
    assert advantages[0].tolist() == pytest.approx([0.49328, 0.574, 0.7], abs=1e-6)
    close(advantages, gae_by_hand(rewards, values, [3, 2], gamma, lam))
    close(returns, (advantages + torch.tensor(values)) * inputs.mask)


def test_gae_ragged_batch_against_loop(pm):
    gamma, lam = 0.95, 0.7
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(6, 4, generator=generator).tolist()
    inputs = inputs_of(values=values, gamma=gamma, lam=lam)
    advantages, returns = estimate(pm, "gae", inputs)
    close(advantages, gae_by_hand(TOKEN_REWARDS, values, LENGTHS, gamma, lam), atol=1e-5)
    expected_returns = [
        [a + v if t < n else 0.0 for t, (a, v) in enumerate(zip(ar, vr, strict=True))]
        for ar, vr, n in zip(advantages.tolist(), values, LENGTHS, strict=True)
    ]
    close(returns, expected_returns)


def test_gae_without_values_is_an_align_error(pm):
    with pytest.raises(AlignError, match="critic"):
        estimate(pm, "gae", inputs_of())


def test_estimator_flags(pm):
    flags = {
        n: (pm.get("advantage estimator", n).needs_critic, pm.get("advantage estimator", n).needs_groups)
        for n in ("gae", "grpo", "rloo", "reinforce_pp")
    }
    assert flags == {"gae": (True, False), "grpo": (False, True), "rloo": (False, True), "reinforce_pp": (False, False)}


def test_grpo_rejects_unknown_scale(pm):
    estimator = pm.get("advantage estimator", "grpo")
    with pytest.raises(AlignError):
        build(estimator.Config, {"scale_rewards": "sometimes"}, "x")


def test_group_reduce_non_contiguous_groups():
    values = torch.tensor([1.0, 4.0, 3.0, 6.0, 8.0])
    groups = torch.tensor([5, 2, 5, 2, 2])
    # group 5: {1, 3}; group 2: {4, 6, 8}
    expected = {
        "mean": [2.0, 6.0, 2.0, 6.0, 6.0],
        "sum": [4.0, 18.0, 4.0, 18.0, 18.0],
        "std": [math.sqrt(2), 2.0, math.sqrt(2), 2.0, 2.0],  # (1 + 1) / 1; (4 + 0 + 4) / 2
        "count": [2.0, 3.0, 2.0, 3.0, 3.0],
        "amax": [3.0, 8.0, 3.0, 8.0, 8.0],
        "amin": [1.0, 4.0, 1.0, 4.0, 4.0],
    }
    for reduce, want in expected.items():
        close(group_reduce(values, groups, reduce), want)


def test_group_reduce_group_of_one_and_negatives():
    values = torch.tensor([-5.0, -1.0, -2.0])
    groups = torch.tensor([7, 3, 3])
    close(group_reduce(values, groups, "std"), [0.0, math.sqrt(0.5), math.sqrt(0.5)])
    close(group_reduce(values, groups, "amax"), [-5.0, -1.0, -1.0])
    close(group_reduce(values, groups, "amin"), [-5.0, -2.0, -2.0])


# ------------------------------------------------------------------------------------------- losses

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_totals():
    totals = Totals.of(MASK, 4)
    assert (totals.tokens, totals.rows, totals.max_new_tokens) == (3.0, 2, 4)
    assert Totals.of(torch.zeros(2, 3), 4).tokens == 1.0  # never a division by zero


def test_aggregations_by_hand():
    totals = Totals.of(MASK, 4)
    assert aggregate(VALUES, MASK, "token", totals).item() == pytest.approx((1 + 2 + 4) / 3)
    assert aggregate(VALUES, MASK, "sequence", totals).item() == pytest.approx(((1 + 2) / 2 + 4 / 1) / 2)
    assert aggregate(VALUES, MASK, "constant", totals).item() == pytest.approx((1 + 2 + 4) / (2 * 4))


def random_minibatch(rows=7, width=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = [5, 1, 3, 4, 2, 5, 1][:rows]
    return torch.randn(rows, width, generator=generator), mask_of(lengths, width)


@pytest.mark.parametrize("how", ["token", "sequence", "constant"])
@pytest.mark.parametrize("splits", [[2, 5, 7], [1, 2, 3, 4, 5, 6, 7], [3, 7]])
def test_micro_batches_sum_to_the_minibatch(how, splits):
    values, mask = random_minibatch()
    totals = Totals.of(mask, 6)
    whole = aggregate(values, mask, how, totals)
    begin, parts = 0, []
    for end in splits:
        parts.append(aggregate(values[begin:end], mask[begin:end], how, totals))
        begin = end
    assert sum(p.item() for p in parts) == pytest.approx(whole.item(), abs=1e-6)


@pytest.mark.parametrize("how", ["token", "sequence", "constant"])
def test_policy_and_kl_losses_sum_over_micro_batches(how):
    values, mask = random_minibatch()
    generator = torch.Generator().manual_seed(1)
    old = -torch.rand(7, 5, generator=generator)
    new = old + 0.3 * torch.randn(7, 5, generator=generator)
    advantages = torch.randn(7, 5, generator=generator)
    totals = Totals.of(mask, 6)
    options = {"clip_low": 0.2, "clip_high": 0.28, "how": how, "totals": totals}
    whole = policy_loss(new, old, advantages, mask, **options)
    whole_kl = kl_loss(new, old, mask, how=how, totals=totals)
    parts = [policy_loss(new[s], old[s], advantages[s], mask[s], **options) for s in (slice(0, 3), slice(3, 7))]
    kls = [kl_loss(new[s], old[s], mask[s], how=how, totals=totals) for s in (slice(0, 3), slice(3, 7))]
    assert sum(p.loss.item() for p in parts) == pytest.approx(whole.loss.item(), abs=1e-6)
    assert sum(p.clip_fraction for p in parts) == pytest.approx(whole.clip_fraction, abs=1e-6)
    assert sum(p.approx_kl for p in parts) == pytest.approx(whole.approx_kl, abs=1e-6)
    assert sum(k.item() for k in kls) == pytest.approx(whole_kl.item(), abs=1e-6)


def dapo_case():
    # (ratio, advantage) per token; the last token of row 1 is padding (its huge terms must not count)
    ratios = [[1.5, 0.5, 1.0], [1.5, 0.5, 3.0]]
    advantages = [[1.0, -1.0, 2.0], [-1.0, 1.0, 5.0]]
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.2, -3.0]])
    new = (old + torch.log(torch.tensor(ratios))).requires_grad_(True)
    return new, old, torch.tensor(advantages), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_policy_loss_clip_higher():
    new, old, advantages, mask = dapo_case()
    totals = Totals.of(mask, 3)
    result = policy_loss(new, old, advantages, mask, clip_low=0.2, clip_high=0.28, how="token", totals=totals)
    # token losses = max(-A r, -A clip(r, 0.8, 1.28)):
    #   r 1.5, A +1 → max(-1.5, -1.28) = -1.28 (clipped at 1 + clip_high)
    #   r 0.5, A -1 → max(0.5, 0.8) = 0.8 (clipped at 1 - clip_low)
    #   r 1.0, A +2 → -2
    #   r 1.5, A -1 → max(1.5, 1.28) = 1.5 (not clipped)
    #   r 0.5, A +1 → max(-0.5, -0.8) = -0.5 (not clipped)
    token_losses = [-1.28, 0.8, -2.0, 1.5, -0.5]
    assert result.loss.item() == pytest.approx(sum(token_losses) / 5, abs=1e-6)
    assert result.clip_fraction == pytest.approx(2 / 5)
    assert result.approx_kl == pytest.approx(0.5 * 2 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 5, abs=1e-6)
    # the clipped tokens have no gradient; the others d/dlogp (-A r) / 5 = -A r / 5
    result.loss.backward()
    expected_grad = [[0.0, 0.0, -2.0 * 1.0 / 5], [1.5 / 5, -0.5 / 5, 0.0]]
    close(new.grad, expected_grad)

    sequence = policy_loss(new, old, advantages, mask, clip_low=0.2, clip_high=0.28, how="sequence", totals=totals)
    assert sequence.loss.item() == pytest.approx(((-1.28 + 0.8 - 2.0) / 3 + (1.5 - 0.5) / 2) / 2, abs=1e-6)
    constant = policy_loss(new, old, advantages, mask, clip_low=0.2, clip_high=0.28, how="constant", totals=totals)
    assert constant.loss.item() == pytest.approx(sum(token_losses) / (2 * 3), abs=1e-6)


def test_policy_loss_symmetric_clip_clips_the_high_ratio_lower():
    new, old, advantages, mask = dapo_case()
    totals = Totals.of(mask, 3)
    result = policy_loss(new, old, advantages, mask, clip_low=0.2, clip_high=0.2, how="token", totals=totals)
    assert result.loss.item() == pytest.approx((-1.2 + 0.8 - 2.0 + 1.5 - 0.5) / 5, abs=1e-6)


def test_value_loss_clipping():
    old = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    values = torch.tensor([[1.0, 0.6, 0.0, 9.0]])
    returns = torch.tensor([[1.0, 2.0, 1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipped = value_loss(values, old, returns, mask, clip_range=0.2, totals=Totals.of(mask, 4))
    # token 0: clipped value 0.7 → max(0, 0.09) = 0.09 (clipped); token 1: 1.96 both;
    # token 2: clipped value 0.3 → max(1.0, 0.49) = 1.0 (not clipped); token 3 is padding
    assert loss.item() == pytest.approx(0.5 * (0.09 + 1.96 + 1.0) / 3, abs=1e-6)
    assert clipped == pytest.approx(1 / 3)


def test_kl_estimators_and_kl_loss():
    logprobs = torch.tensor([[-1.0, -0.2, -3.0], [-0.5, -2.0, -7.0]])
    ref = torch.tensor([[-1.5, -0.1, -3.0], [-0.4, -1.0, -0.1]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    lp, rf = logprobs.tolist(), ref.tolist()
    k1 = [[p - q for p, q in zip(a, b, strict=True)] for a, b in zip(lp, rf, strict=True)]
    # k3 = (r - 1) - log r with r = q / p
    k3 = [[(math.exp(q - p) - 1) - (q - p) for p, q in zip(a, b, strict=True)] for a, b in zip(lp, rf, strict=True)]
    close(kl_per_token(logprobs, ref, "k1"), k1)
    close(kl_per_token(logprobs, ref, "k3"), k3, atol=1e-6, rtol=1e-5)
    assert (kl_per_token(logprobs, ref, "k3") >= 0).all()
    live = [k3[0][0], k3[0][1], k3[0][2], k3[1][0], k3[1][1]]
    totals = Totals.of(mask, 5)
    assert kl_loss(logprobs, ref, mask, how="token", totals=totals).item() == pytest.approx(sum(live) / 5, rel=1e-5)
    sequence = (sum(live[:3]) / 3 + sum(live[3:]) / 2) / 2
    assert kl_loss(logprobs, ref, mask, how="sequence", totals=totals).item() == pytest.approx(sequence, rel=1e-5)
    assert kl_loss(logprobs, ref, mask, how="constant", totals=totals).item() == pytest.approx(sum(live) / 10, rel=1e-5)


# ------------------------------------------------------------------------ gradient accumulation (toy)

VOCAB = 11


class ToyLM(torch.nn.Module):
    """Logits from the token and a masked running mean of the tokens before it (rows never mix)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(16, VOCAB)

    def hidden(self, input_ids, attention_mask, position_ids):
        embedded = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        context = embedded.cumsum(1) / (position_ids.unsqueeze(-1) + 1)
        return torch.cat([embedded, context], -1)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0):
        logits = self.head(self.hidden(input_ids, attention_mask, position_ids))
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])  # as transformers' models keep the last ones


class ToyValue(torch.nn.Module):
    """A sequence classifier as align.sequences.token_values reads one (backbone + score)."""

    base_model_prefix = "backbone"

    def __init__(self, lm: ToyLM) -> None:
        super().__init__()
        self.lm = lm
        self.score = torch.nn.Linear(16, 1)

    def backbone(self, input_ids, attention_mask, position_ids):
        return SimpleNamespace(last_hidden_state=self.lm.hidden(input_ids, attention_mask, position_ids))


def toy_batch(model, temperature):
    prompts = [[1, 2], [3], [4, 5, 6], [7], [8, 9]]
    responses = [[3, 4, 10], [5], [], [6, 7, 8, 9], [1, 10]]
    batch = RolloutBatch.pack(prompts, responses, [0, 0, 1, 1, 2], eos_token_id=10, pad_token_id=0, device="cpu")
    generator = torch.Generator().manual_seed(3)
    mask = batch.response_mask
    batch.logprobs, batch.values = policy_logprobs(model, batch, temperature, None)
    batch.logprobs = (batch.logprobs + 0.2 * torch.randn(mask.shape, generator=generator)) * mask
    batch.ref_logprobs = (batch.logprobs + 0.3 * torch.randn(mask.shape, generator=generator)) * mask
    batch.values = (batch.values + 0.3 * torch.randn(mask.shape, generator=generator)) * mask
    batch.advantages = torch.randn(mask.shape, generator=generator) * mask
    batch.returns = torch.randn(mask.shape, generator=generator) * mask
    return batch


def micro_loss(model, micro, totals, how, temperature):
    """What the loop's _micro_loss computes: policy + 0.1 value + 0.05 KL."""
    mask = micro.response_mask
    logits, values = model(micro)
    logprobs = logprobs_of(logits, micro.responses, temperature) * mask
    loss = policy_loss(
        logprobs, micro.logprobs, micro.advantages, mask, clip_low=0.2, clip_high=0.28, how=how, totals=totals
    ).loss
    values = values * mask
    loss = loss + 0.1 * value_loss(values, micro.values, micro.returns, mask, clip_range=0.2, totals=totals)[0]
    return loss + 0.05 * kl_loss(logprobs, micro.ref_logprobs, mask, how=how, totals=totals)


@pytest.mark.parametrize("how", ["token", "sequence", "constant"])
def test_gradient_accumulation_equals_the_whole_minibatch(how):
    torch.manual_seed(0)
    lm = ToyLM()
    model = PolicyAndValue(lm, ToyValue(lm))
    temperature = 0.7
    batch = toy_batch(model, temperature)
    totals = Totals.of(batch.response_mask, 4)

    def gradients(size):
        model.zero_grad()
        for micro in batch.chunks(size):
            micro_loss(model, micro, totals, how, temperature).backward()
        return [p.grad.clone() for p in model.parameters()]

    whole = gradients(None)
    assert any(g.abs().sum() > 0 for g in whole)
    for size in (1, 2, 3):
        for accumulated, expected in zip(gradients(size), whole, strict=True):
            assert torch.allclose(accumulated, expected, atol=1e-6, rtol=0), size


# --------------------------------------------------------------------------------------- RolloutBatch


def packed():
    return RolloutBatch.pack(
        [[1, 2], [3], [4, 5, 6]], [[7, 8, 10], [], [9]], [4, 4, 1], eos_token_id=10, pad_token_id=0, device="cpu"
    )


def test_pack_layout():
    batch = packed()
    assert batch.prompt_width == 3
    assert batch.input_ids.tolist() == [[0, 1, 2, 7, 8, 10], [0, 0, 3, 10, 0, 0], [4, 5, 6, 9, 0, 0]]
    assert batch.attention_mask.tolist() == [[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 0, 1, 2, 3, 4], [0, 0, 0, 1, 1, 1], [0, 1, 2, 3, 3, 3]]
    assert batch.responses.tolist() == [[7, 8, 10], [10, 0, 0], [9, 0, 0]]  # the empty response: a lone EOS
    assert batch.response_mask.tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    assert batch.response_mask.dtype == torch.float32
    assert batch.response_lengths.tolist() == [3, 1, 1]
    assert batch.ended.tolist() == [True, True, False]
    assert batch.groups.tolist() == [4, 4, 1]
    assert len(batch) == 3
    assert batch.last_tokens.tolist() == [5, 3, 3]
    assert batch.input_ids[torch.arange(3), batch.last_tokens].tolist() == [10, 10, 9]
    assert set(batch.model_inputs) == {"input_ids", "attention_mask", "position_ids"}
    assert batch.logprobs is None and batch.advantages is None


def test_select_by_index_and_by_mask():
    batch = packed()
    batch.logprobs = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0], [0.5, 0.0, 0.0]])
    by_index = batch.select(torch.tensor([2, 0]))
    assert by_index.input_ids.tolist() == [[4, 5, 6, 9, 0, 0], [0, 1, 2, 7, 8, 10]]
    close(by_index.logprobs, [[0.5, 0.0, 0.0], [0.1, 0.2, 0.3]])
    assert by_index.groups.tolist() == [1, 4] and by_index.ended.tolist() == [False, True]
    assert by_index.prompt_width == 3 and by_index.values is None
    assert by_index.last_tokens.tolist() == [3, 5]
    by_mask = batch.select(torch.tensor([True, False, True]))
    assert by_mask.input_ids.tolist() == [[0, 1, 2, 7, 8, 10], [4, 5, 6, 9, 0, 0]]
    assert by_mask.response_lengths.tolist() == [3, 1]
    assert by_mask.responses.shape == (2, 3)  # the padding columns are kept


def test_chunks():
    batch = packed()
    parts = list(batch.chunks(2))
    assert [len(p) for p in parts] == [2, 1]
    assert torch.equal(torch.cat([p.input_ids for p in parts]), batch.input_ids)
    assert torch.equal(torch.cat([p.groups for p in parts]), batch.groups)
    assert all(p.prompt_width == 3 and p.input_ids.shape[1] == 6 for p in parts)
    assert [len(p) for p in batch.chunks(1)] == [1, 1, 1]
    for size in (None, 3, 10):
        (whole,) = list(batch.chunks(size))
        assert torch.equal(whole.input_ids, batch.input_ids)
        assert torch.equal(whole.response_mask, batch.response_mask)


# -------------------------------------------------------------------------------------- forward.py


def test_logprobs_and_entropy_at_temperature():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 3, 5, generator=generator)
    tokens = torch.tensor([[0, 4, 2], [1, 1, 3]])
    for temperature in (1.0, 0.5, 1.7):
        expected_lp, expected_h = [], []
        for row, row_tokens in zip(logits.tolist(), tokens.tolist(), strict=True):
            lps, hs = [], []
            for position, token in zip(row, row_tokens, strict=True):
                z = [x / temperature for x in position]
                log_total = math.log(sum(math.exp(x) for x in z))
                probs = [math.exp(x - log_total) for x in z]
                lps.append(z[token] - log_total)
                hs.append(-sum(p * math.log(p) for p in probs))
            expected_lp.append(lps)
            expected_h.append(hs)
        close(logprobs_of(logits, tokens, temperature), expected_lp, atol=1e-5)
        close(entropy_of(logits, temperature), expected_h, atol=1e-5)
    assert logprobs_of(logits.half(), tokens).dtype == torch.float32
    # the temperature matters: a lower one is a sharper distribution
    assert (entropy_of(logits, 0.5) < entropy_of(logits, 1.0)).all()


def test_response_logits_are_one_column_to_the_left_and_only_those_are_computed():
    batch = packed()
    kept = []

    def model(input_ids, attention_mask, position_ids, logits_to_keep):
        kept.append(logits_to_keep)
        logits = torch.arange(3 * 6, dtype=torch.float).reshape(3, 6, 1)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])

    assert response_logits(model, batch)[:, :, 0].tolist() == [[2, 3, 4], [8, 9, 10], [14, 15, 16]]
    assert kept == [4]  # the 3 response columns and the one before them


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=32,
        max_position_embeddings=64,
        pad_token_id=0,
        num_labels=1,
    )
    torch.manual_seed(0)
    causal = LlamaForCausalLM(config).eval()
    classifier = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():  # a random classifier head of a fresh model is small: make the scores distinct
        classifier.score.weight.normal_(0, 1.0)
    return causal, classifier


PROMPTS = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
RESPONSES = [[15, 16], [17, 18, 19, 31], [], [20]]
EOS = 31


def llama_batch():
    return RolloutBatch.pack(PROMPTS, RESPONSES, [0, 0, 1, 1], eos_token_id=EOS, pad_token_id=0, device="cpu")


def unpadded_rows():
    return [(p, r or [EOS]) for p, r in zip(PROMPTS, RESPONSES, strict=True)]


def test_policy_logprobs_and_values_by_row_and_by_chunk(tiny_llama):
    causal, classifier = tiny_llama
    batch = llama_batch()
    model = PolicyAndValue(causal, classifier)
    temperature = 0.8
    results = {chunk: policy_logprobs(model, batch, temperature, chunk) for chunk in (1, 2, None)}
    logprobs, values = results[None]
    for chunk in (1, 2):
        assert torch.allclose(results[chunk][0], logprobs, atol=1e-5)
        assert torch.allclose(results[chunk][1], values, atol=1e-5)
    assert (logprobs * (1 - batch.response_mask)).abs().sum() == 0  # zero on padding
    assert (values * (1 - batch.response_mask)).abs().sum() == 0
    # each row alone, unpadded: the log-probability of each response token and the value before it
    with torch.no_grad():
        for i, (prompt, response) in enumerate(unpadded_rows()):
            ids = torch.tensor([prompt + response])
            logits = causal(input_ids=ids).logits[0].tolist()
            row_values = token_values(
                classifier,
                {
                    "input_ids": ids,
                    "attention_mask": torch.ones_like(ids),
                    "position_ids": torch.arange(ids.shape[1]).unsqueeze(0),
                },
            )[0]
            for t, token in enumerate(response):
                z = [x / temperature for x in logits[len(prompt) - 1 + t]]
                expected = z[token] - math.log(sum(math.exp(x) for x in z))
                assert logprobs[i, t].item() == pytest.approx(expected, abs=1e-4)
                assert values[i, t].item() == pytest.approx(row_values[len(prompt) - 1 + t].item(), abs=1e-4)
    assert PolicyAndValue(causal, None)(batch)[1] is None
    assert policy_logprobs(PolicyAndValue(causal, None), batch, temperature, 2)[1] is None


def test_reference_logprobs_by_chunk(tiny_llama):
    causal, _ = tiny_llama
    batch = llama_batch()
    expected, _ = policy_logprobs(PolicyAndValue(causal, None), batch, 1.3, None)
    for chunk in (1, 2, None):
        assert torch.allclose(Reference(causal).logprobs(batch, 1.3, chunk), expected, atol=1e-5)


def test_reference_through_a_disabled_adapter(tiny_llama):
    causal, _ = tiny_llama
    batch = llama_batch()
    switched = []

    class Adapted:
        def __call__(self, **inputs):
            return causal(**inputs)

        @contextmanager
        def disable_adapter(self):
            switched.append("off")
            yield
            switched.append("on")

    expected = Reference(causal).logprobs(batch, 1.0, None)
    assert torch.allclose(Reference().logprobs(batch, 1.0, 2, policy=Adapted()), expected, atol=1e-6)
    assert switched == ["off", "on"]
    with pytest.raises(ValueError):
        Reference().logprobs(batch, 1.0, None)


def test_reward_scores_by_row_and_by_chunk(tiny_llama):
    _, classifier = tiny_llama
    batch = llama_batch()
    scores = {chunk: reward_scores(classifier, batch, chunk) for chunk in (1, 2, None)}
    assert scores[None].shape == (4,)
    for chunk in (1, 2):
        assert torch.allclose(scores[chunk], scores[None], atol=1e-5)
    with torch.no_grad():  # the classifier's own forward on each row alone (no padding: its last token)
        alone = [classifier(input_ids=torch.tensor([p + r])).logits[0, 0].item() for p, r in unpadded_rows()]
    assert scores[None].tolist() == pytest.approx(alone, abs=1e-4)
    assert len(set(round(s, 4) for s in alone)) == 4


# ------------------------------------------------------------------------------------- PromptSampler


def prompts(count=7):
    return [Prompt([i], {"answer": str(i)}) for i in range(count)]


def ids(batch):
    return [p.ids[0] for p in batch]


def test_prompt_sampler_follows_the_seeded_shuffle():
    sampler = PromptSampler(prompts(), seed=3, rank=0, world=2)
    expected = []
    for epoch in range(3):
        order = list(range(7))
        random.Random(3 + epoch).shuffle(order)
        expected += [i for i in order if i % 2 == 0]
    drawn = ids(sampler.next(5)) + ids(sampler.next(5)) + ids(sampler.next(2))
    assert drawn == expected


def test_prompt_sampler_is_deterministic_by_seed():
    a, b = PromptSampler(prompts(), seed=11), PromptSampler(prompts(), seed=11)
    assert [ids(a.next(3)) for _ in range(5)] == [ids(b.next(3)) for _ in range(5)]
    c = PromptSampler(prompts(), seed=12)
    a = PromptSampler(prompts(), seed=11)
    assert [ids(a.next(7)) for _ in range(3)] != [ids(c.next(7)) for _ in range(3)]


def test_two_processes_share_no_prompt_and_cover_each_epoch():
    ranks = [PromptSampler(prompts(), seed=5, rank=r, world=2) for r in range(2)]
    # 7 prompts: rank 0 has the 4 even indices, rank 1 the 3 odd ones, per epoch
    for _epoch in range(3):
        zero, one = ids(ranks[0].next(4)), ids(ranks[1].next(3))
        assert not set(zero) & set(one)
        assert sorted(zero + one) == list(range(7))
        assert len(set(zero)) == 4 and len(set(one)) == 3
    assert all(s.epoch == 3 for s in ranks)


def test_prompt_sampler_resumes_exactly():
    sampler = PromptSampler(prompts(), seed=2, rank=1, world=2)
    sampler.next(2)
    state = json.loads(json.dumps(sampler.state_dict()))  # as a checkpoint would carry it
    uninterrupted = [ids(sampler.next(2)) for _ in range(4)]  # crosses epoch boundaries
    resumed = PromptSampler(prompts(), seed=2, rank=1, world=2)
    resumed.load_state_dict(state)
    assert [ids(resumed.next(2)) for _ in range(4)] == uninterrupted
    # a state taken before any draw resumes too
    fresh = PromptSampler(prompts(), seed=2)
    state = fresh.state_dict()
    first = ids(fresh.next(9))
    again = PromptSampler(prompts(), seed=2)
    again.load_state_dict(state)
    assert ids(again.next(9)) == first
    # the state is a copy, not a view of the sampler: changing it changes nothing
    state = sampler.state_dict()
    expected = PromptSampler(prompts(), seed=2, rank=1, world=2)
    expected.load_state_dict(state)
    state["order"].reverse()
    state["position"] = 0
    assert ids(sampler.next(5)) == ids(expected.next(5))


def test_prompt_sampler_keeps_columns():
    (prompt,) = PromptSampler(prompts(), seed=0).next(1)
    assert prompt.columns == {"answer": str(prompt.ids[0])}


def test_fewer_prompts_than_processes():
    with pytest.raises(ValueError):
        PromptSampler(prompts(1), seed=0, rank=0, world=2)
    PromptSampler(prompts(2), seed=0, rank=1, world=2)  # one each is enough


# ---------------------------------------------------------------------------------- KL controllers


def test_fixed_kl_does_not_move():
    controller = FixedKL(0.1)
    for kl in (0.0, 6.0, 100.0):
        controller.update(kl, 64)
    assert controller.value == 0.1


def test_adaptive_kl():
    controller = AdaptiveKL(0.1, target=6.0, horizon=10000.0)
    controller.update(6.6, 100)  # error 0.1: × (1 + 0.1 · 100 / 10000)
    assert controller.value == pytest.approx(0.1 * 1.001)
    controller = AdaptiveKL(0.1, target=6.0, horizon=10000.0)
    controller.update(9.0, 100)  # error 0.5, clipped to 0.2
    assert controller.value == pytest.approx(0.1 * 1.002)
    controller.update(1e9, 100)  # still bounded
    assert controller.value == pytest.approx(0.1 * 1.002 * 1.002)
    controller = AdaptiveKL(0.1, target=6.0, horizon=10000.0)
    controller.update(5.4, 100)  # error -0.1
    assert controller.value == pytest.approx(0.1 * 0.999)
    controller.update(0.0, 100)  # error -1, clipped to -0.2
    assert controller.value == pytest.approx(0.1 * 0.999 * 0.998)
    controller = AdaptiveKL(0.1, target=6.0, horizon=10000.0)
    controller.update(6.0, 100)
    assert controller.value == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------- Scorer


class Recorder(RewardFunction):
    name = "recorder"

    def __init__(self, scores):
        self.scores, self.calls = scores, []

    def __call__(self, prompts, responses, **columns):
        self.calls.append((list(prompts), list(responses), columns))
        return self.scores


class Length(RewardFunction):
    name = "length"

    def __call__(self, prompts, responses, **columns):
        return [len(r) for r in responses]


class NoColumns(RewardFunction):
    name = "no_columns"

    def __call__(self, prompts, responses):
        return [0.0] * len(responses)


def test_scorer_weights_and_parts(tiny_llama):
    _, classifier = tiny_llama
    batch = llama_batch()
    recorder = Recorder([1.0, -2.0, 0.5, 3.0])
    columns = {"answer": ["a", "b", "c", "d"], "level": [1, 2, 3, 4]}
    prompt_texts, response_texts = ["p0", "p1", "p2", "p3"], ["x", "yy", "", "zzzz"]
    scorer = Scorer(classifier, [(recorder, 2.0), (Length(), -0.5)], reward_model_weight=0.25, chunk=3)
    scores = scorer(batch, prompt_texts, response_texts, columns)
    with torch.no_grad():
        rm = [classifier(input_ids=torch.tensor([p + r])).logits[0, 0].item() for p, r in unpadded_rows()]
    assert set(scores.parts) == {"rm_score", "reward_recorder", "reward_length"}
    assert scores.parts["rm_score"].tolist() == pytest.approx(rm, abs=1e-4)
    assert scores.parts["reward_recorder"].tolist() == [1.0, -2.0, 0.5, 3.0]
    assert scores.parts["reward_length"].tolist() == [1.0, 2.0, 0.0, 4.0]
    expected = [0.25 * s + 2.0 * f - 0.5 * n for s, f, n in zip(rm, [1.0, -2.0, 0.5, 3.0], [1, 2, 0, 4], strict=True)]
    assert scores.total.tolist() == pytest.approx(expected, abs=1e-4)
    assert recorder.calls == [(prompt_texts, response_texts, columns)]


def test_scorer_functions_only():
    batch = llama_batch()
    scores = Scorer(None, [(Length(), 1.0)])(batch, ["p"] * 4, ["a", "bb", "ccc", ""], {})
    assert set(scores.parts) == {"reward_length"}
    assert scores.total.tolist() == [1.0, 2.0, 3.0, 0.0]
    with pytest.raises(ValueError):
        Scorer(None, [])


def test_reward_function_checks_what_it_returns():
    with pytest.raises(AlignError, match="'recorder'.*3 scores for 2 responses"):
        Recorder([1.0, 2.0, 3.0]).score(["p", "q"], ["a", "b"])
    with pytest.raises(AlignError, match="'recorder'.*nan"):
        Recorder([1.0, float("nan")]).score(["p", "q"], ["a", "b"])
    with pytest.raises(AlignError, match="'recorder'.*inf"):
        Recorder([float("inf"), 1.0]).score(["p", "q"], ["a", "b"])
    with pytest.raises(AlignError, match="'no_columns'"):
        NoColumns().score(["p"], ["a"], {"answer": ["1"]})
    assert NoColumns().score(["p"], ["a"]) == [0.0]
    recorder = Recorder([1, 2])
    assert recorder.score(["p", "q"], ["a", "b"], {"answer": ["x", "y"]}) == [1.0, 2.0]
    assert recorder.calls[0][2] == {"answer": ["x", "y"]}
