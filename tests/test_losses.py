"""losses.py: each loss by hand, the gradient's closed form, ln 2 at step 0, the stacked forward
against separate ones, packed rows against padded ones, and (dpo.py) precomputed reference log-probs
against live ones."""

import copy
import math

import numpy as np
import pytest
import torch

import losses
import checkpoint
import parallel
from losses import dpo_batch, sft_batch
from data import tokenize_pairs
from model import GPT, GPTConfig, weights_sha256
from data import synthetic_pairs

B = dict(policy_chosen_logps=torch.tensor([-1.0]), policy_rejected_logps=torch.tensor([-2.0]),
         ref_chosen_logps=torch.tensor([-1.5]), ref_rejected_logps=torch.tensor([-1.5]),
         chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([4]))
softplus = lambda x: math.log1p(math.exp(x))  # -log sigmoid(-x)


@pytest.mark.parametrize('kw,expected', [
    # rewards 0.1 * (-1 + 1.5) = 0.05 and 0.1 * (-2 + 1.5) = -0.05: margin 0.1
    (dict(loss_type='sigmoid'), softplus(-0.1)),
    (dict(loss_type='sigmoid', label_smoothing=0.2), 0.8 * softplus(-0.1) + 0.2 * softplus(0.1)),
    (dict(loss_type='ipo'), (0.1 / 0.1 - 1 / 0.2) ** 2),  # (1 - 5)^2 = 16
    (dict(loss_type='hinge'), 1 - 0.1),
    (dict(loss_type='sigmoid', rpo_alpha=0.5), softplus(-0.1) + 0.5 * 1.0 / 2),  # + alpha * NLL per chosen token
    # simpo: rewards 0.1 * -1 / 2 = -0.05 and 0.1 * -2 / 4 = -0.05: margin 0, minus gamma 0.5
    (dict(loss_type='simpo', simpo_gamma=0.5), softplus(0.5)),
])
def test_losses_by_hand(kw, expected):
    loss, chosen_rewards, rejected_rewards = losses.preference_loss(**B, beta=0.1, **kw)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert not chosen_rewards.requires_grad


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type must be one of sigmoid, ipo, hinge, simpo; got 'dpo'"):
        losses.preference_loss(**B, beta=0.1, loss_type='dpo')


@pytest.fixture(scope='module')
def pairs():
    return tokenize_pairs(synthetic_pairs(6, seed=0), 64, 32)


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=16))


def test_step_zero_loss_is_ln2_and_margins_zero(pairs, model):
    batch = dpo_batch(pairs, [0, 1, 2, 3])
    chosen, rejected = losses.chosen_rejected_logps(model, batch)
    with torch.no_grad():
        ref_chosen, ref_rejected = losses.chosen_rejected_logps(model, batch)  # the reference is the policy
    pair_losses, chosen_rewards, rejected_rewards = losses.preference_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1)
    assert torch.all(pair_losses == math.log(2))
    totals = losses.dpo_totals(pair_losses, chosen_rewards, rejected_rewards, chosen, rejected)
    assert totals[:, 1].tolist() == [4] * len(losses.DPO_METRICS)  # every metric counts the 4 pairs
    assert losses.means(losses.DPO_METRICS, totals)['rewards/accuracies'] == 0.5  # ties count one half
    assert torch.all(chosen_rewards - rejected_rewards == 0)


def test_gradient_is_the_closed_form(pairs, model):
    """d loss = -beta * sigmoid(r_l - r_w) * (d logp(y_w) - d logp(y_l)), for a policy away from its reference."""
    ref = model
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    beta, params = 0.1, list(policy.parameters())
    batch = dpo_batch(pairs, [2])
    with torch.no_grad():
        ref_chosen, ref_rejected = losses.chosen_rejected_logps(ref, batch)
    chosen, rejected = losses.chosen_rejected_logps(policy, batch)
    loss = losses.preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta)[0].sum()
    grad_loss = torch.autograd.grad(loss, params, retain_graph=True)
    grad_chosen = torch.autograd.grad(chosen.sum(), params, retain_graph=True)
    grad_rejected = torch.autograd.grad(rejected.sum(), params)
    r_w, r_l = beta * (chosen - ref_chosen).item(), beta * (rejected - ref_rejected).item()
    weight = -beta / (1 + math.exp(-(r_l - r_w)))  # -beta * sigmoid(r_l - r_w)
    assert abs(r_w - r_l) > 1e-3  # a real test: the weight is not the step-0 value
    for g, gw, gl in zip(grad_loss, grad_chosen, grad_rejected):
        torch.testing.assert_close(g, weight * (gw - gl), atol=1e-6, rtol=1e-4)


def test_stacked_forward_equals_separate_forwards(pairs, model):
    indices = [0, 3, 5]
    with torch.no_grad():
        chosen, rejected = losses.chosen_rejected_logps(model, dpo_batch(pairs, indices))
        alone_chosen = model(*sft_batch(pairs, indices)[:2]).sum(dim=1)  # prompt + chosen only, its own padding
        # the rejected rows on their own: the second half of a batch made of rejected responses only
        swapped = copy.copy(pairs)
        swapped.arrays = {**pairs.arrays, 'chosen_tokens': pairs.arrays['rejected_tokens'],
                          'chosen_offsets': pairs.arrays['rejected_offsets']}
        alone_rejected = model(*sft_batch(swapped, indices)[:2]).sum(dim=1)
    torch.testing.assert_close(chosen, alone_chosen, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(rejected, alone_rejected, atol=1e-5, rtol=1e-6)


def test_precomputed_reference_equals_live(pairs, model, tmp_path, monkeypatch):
    run = parallel.start('cpu', 'float32', 0)
    pairs = copy.copy(pairs)
    pairs.path = str(tmp_path / 'pairs.npz')
    precomputed = losses.reference_logps(model, weights_sha256(model), pairs, 8, False, run)
    cached = [p.name for p in tmp_path.iterdir()]
    assert len(cached) == 1 and cached[0].startswith('pairs-ref-') and cached[0].endswith('-float32.npy')
    again = losses.reference_logps(model, weights_sha256(model), pairs, 8, False, run)  # read back from the file
    assert (precomputed == again).all()
    with torch.no_grad():
        live = torch.stack(losses.chosen_rejected_logps(model, dpo_batch(pairs, list(range(len(pairs))))), dim=1)
    torch.testing.assert_close(torch.from_numpy(precomputed), live, atol=1e-5, rtol=0)



def test_a_broken_reference_cache_is_rebuilt(pairs, model, tmp_path):
    """The cached reference log-probs cut short (a crash, a full disk) or of another shape (another
    dataset's file under the name) are computed again, not read as they are."""
    run = parallel.start('cpu', 'float32', 0)
    pairs = copy.copy(pairs)
    pairs.path = str(tmp_path / 'pairs.npz')
    good = losses.reference_logps(model, weights_sha256(model), pairs, 8, False, run)
    cache = next(tmp_path.iterdir())
    whole = cache.read_bytes()
    for broken in (whole[:len(whole) // 2], b'', None):
        if broken is None:
            np.save(cache, np.zeros((len(pairs) - 1, 2), dtype=np.float32))  # one pair short
        else:
            cache.write_bytes(broken)
        assert (losses.reference_logps(model, weights_sha256(model), pairs, 8, False, run) == good).all()
        assert cache.read_bytes() == whole

def test_simpo_step_runs_no_reference(pairs, model):
    """SimPO is reference-free: dpo_step without a reference (as dpo.py runs it) equals dpo_step with one."""
    batch, settings = dpo_batch(pairs, [0, 1, 2]), dict(beta=2.0, loss_type='simpo', simpo_gamma=0.5)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a reference unlike the policy: were it read, the losses would differ
    with_ref, with_ref_totals = losses.dpo_step(model, other, batch, **settings)
    without, without_totals = losses.dpo_step(model, None, batch, **settings)
    torch.testing.assert_close(without, with_ref, rtol=0, atol=0)
    torch.testing.assert_close(without_totals, with_ref_totals, rtol=0, atol=0)
    with pytest.raises(ValueError, match="loss_type='sigmoid' needs the reference"):  # the others need one
        losses.dpo_step(model, None, batch, beta=0.1)


def test_packed_batch_equals_padded(model, varied_pairs):
    """Several sequences a row, block-diagonal attention, positions from 0 for each: the same log-probs
    and the same gradients as one padded row each."""
    indices = [0, 1, 2, 3]
    padded, packed = dpo_batch(varied_pairs, indices), dpo_batch(varied_pairs, indices, pack=True)
    assert packed.idx.shape[0] < padded.idx.shape[0]  # a real packing: fewer rows
    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        chosen, rejected = losses.chosen_rejected_logps(model, batch)
        (chosen.sum() - 2 * rejected.sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if batch is padded:
            expected = (chosen.detach(), rejected.detach())
    torch.testing.assert_close((chosen.detach(), rejected.detach()), expected, atol=1e-5, rtol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packed_sft_step_equals_padded(model, varied_pairs):
    padded_batch, packed_batch = (sft_batch(varied_pairs, [0, 1, 2, 3], pack) for pack in (False, True))
    assert packed_batch.idx.shape[0] < 4  # a real packing
    padded, packed = losses.sft_step(model, padded_batch), losses.sft_step(model, packed_batch)
    torch.testing.assert_close(packed[0], padded[0], atol=1e-6, rtol=1e-6)  # the loss
    torch.testing.assert_close(packed[1], padded[1], atol=1e-4, rtol=1e-6)  # NLL, log-prob, target sums
    assert packed_batch.flops_shape() == padded_batch.flops_shape()  # padding is not counted either way


def test_held_out_means_run_without_autograd_in_eval_mode(model):
    """The held-out forwards build no graph (no_grad) and see no dropout (eval), and training
    goes on in train mode; the means are over every example once."""
    run = parallel.start('cpu', 'float32', 0)
    seen = []

    def totals_of(indices):
        seen.append((torch.is_grad_enabled(), model.training, len(indices)))
        return torch.tensor([[float(sum(indices)), float(len(indices))]])
    means = losses.held_out_means(model, totals_of, ('loss',), 10, 4, -1, run)
    assert seen == [(False, False, 4), (False, False, 4), (False, False, 2)]
    assert means == {'eval/loss': 4.5} and model.training and torch.is_grad_enabled()
