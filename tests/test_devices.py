"""The fast paths on every device at hand: torch.compile against eager, and (on CUDA) bf16 autocast,
the fused AdamW and packed rows against their simple counterparts. CUDA cases skip without a GPU."""

import copy
import shutil

import pytest
import torch

import dpo
from batches import dpo_batch
from data import tokenize_pairs
from model import GPT, GPTConfig

DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='no GPU'))]


def tiny(device):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=16)).to(device)


@pytest.fixture(scope='module')
def pairs():
    words = 'the cat sat on a mat and then it ran off to see what the dog was doing there'.split()
    return tokenize_pairs([{'prompt': ' '.join(words[:2 + 5 * i]), 'chosen': ' ' + ' '.join(words[i:i + 1 + i % 3]),
                            'rejected': ' ' + ' '.join(words[:1 + 2 * i])} for i in range(4)], 64, 32)


def logps_and_grads(model, batch, dtype):
    model.zero_grad()
    with torch.autocast(batch.idx.device.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
        chosen, rejected = dpo.chosen_rejected_logps(model, batch)
    (chosen.sum() - 2 * rejected.sum()).backward()
    return torch.cat([chosen, rejected]).detach(), [p.grad.clone() for p in model.parameters()]


def assert_close(a, b, dtype):
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == 'float32' else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(a[0], b[0], **tol)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize('device', DEVICES)
def test_compiled_model_equals_eager(device, pairs):
    if device == 'cpu' and not shutil.which('g++'):
        pytest.skip('torch.compile on a CPU needs a C++ compiler')
    dtype = 'bfloat16' if device == 'cuda' else 'float32'
    model = tiny(device)
    batch = dpo_batch(pairs, [0, 1, 2, 3]).to(device)
    eager = logps_and_grads(model, batch, dtype)
    compiled = logps_and_grads(torch.compile(model), batch, dtype)
    assert_close(compiled, eager, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no GPU')
def test_cuda_bf16_packed_rows_and_fused_adamw(pairs):
    """On the GPU: packed rows (a masked attention kernel) equal padded ones (flash attention) in bf16;
    bf16 autocast stays near float32 on the CPU; the fused AdamW steps like the for-loop one."""
    model = tiny('cuda')
    padded, packed = dpo_batch(pairs, [0, 1, 2, 3]), dpo_batch(pairs, [0, 1, 2, 3], pack=True)
    on_gpu = logps_and_grads(model, padded.to('cuda'), 'bfloat16')
    assert_close(logps_and_grads(model, packed.to('cuda'), 'bfloat16'), on_gpu, 'bfloat16')
    on_cpu = logps_and_grads(copy.deepcopy(model).cpu(), padded, 'float32')
    assert_close((on_gpu[0].cpu(), [g.cpu() for g in on_gpu[1]]), on_cpu, 'bfloat16')
    fused = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cuda')
    plain_model = copy.deepcopy(model)
    plain = torch.optim.AdamW([{'params': g['params'], 'weight_decay': g['weight_decay']} for g in
                               plain_model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cuda').param_groups],
                              lr=1e-2, betas=(0.9, 0.95), foreach=False)
    assert all(g['fused'] for g in fused.param_groups)
    generator = torch.Generator('cuda').manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, device='cuda', generator=generator) for p in model.parameters()]
        for m, opt in ((model, fused), (plain_model, plain)):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
