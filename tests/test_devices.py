"""The fast paths on every device at hand: torch.compile against eager, and (on CUDA) bf16 autocast
and packed rows against their simple counterparts. CUDA cases skip without a GPU (the fused AdamW's
CUDA case is in test_model.py)."""

import copy
import shutil

import pytest
import torch

import losses
import parallel
from losses import dpo_batch
from model import GPT, GPTConfig

DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='no GPU'))]


def tiny(device):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=16)).to(device)


def logps_and_grads(model, batch, dtype):
    model.zero_grad()
    with torch.autocast(batch.idx.device.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
        chosen, rejected = losses.chosen_rejected_logps(model, batch)
    (chosen.sum() - 2 * rejected.sum()).backward()
    return torch.cat([chosen, rejected]).detach(), [p.grad.clone() for p in model.parameters()]


def assert_close(a, b, dtype):
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == 'float32' else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(a[0], b[0], **tol)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize('pack', [False, True])
@pytest.mark.parametrize('device', DEVICES)
def test_compiled_model_equals_eager(device, pack, varied_pairs):
    """Compiled as dpo.py compiles (dynamic=True), on two batches of different lengths: the second
    runs the same graph with other sizes."""
    if device == 'cpu' and not shutil.which('g++'):
        pytest.skip('torch.compile on a CPU needs a C++ compiler')
    dtype = 'bfloat16' if device == 'cuda' else 'float32'
    model = tiny(device)
    compiled = parallel.compiled(model)
    for indices in ([0, 1, 2, 3], [1, 2]):
        batch = dpo_batch(varied_pairs, indices, pack).to(device)
        assert_close(logps_and_grads(compiled, batch, dtype), logps_and_grads(model, batch, dtype), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no GPU')
def test_cuda_bf16_packed_rows(varied_pairs):
    """On the GPU: packed rows (a masked attention kernel) equal padded ones (flash attention) in bf16,
    and bf16 autocast stays near float32 on the CPU."""
    model = tiny('cuda')
    padded, packed = dpo_batch(varied_pairs, [0, 1, 2, 3]), dpo_batch(varied_pairs, [0, 1, 2, 3], pack=True)
    on_gpu = logps_and_grads(model, padded.to('cuda'), 'bfloat16')
    assert_close(logps_and_grads(model, packed.to('cuda'), 'bfloat16'), on_gpu, 'bfloat16')
    on_cpu = logps_and_grads(copy.deepcopy(model).cpu(), padded, 'float32')
    assert_close((on_gpu[0].cpu(), [g.cpu() for g in on_gpu[1]]), on_cpu, 'bfloat16')


@pytest.mark.parametrize('device', DEVICES)
def test_cached_generation_equals_recomputed(device):
    """Greedy tokens with the KV cache equal those recomputed over the whole window, for prompts of
    equal lengths (no padding: each new token's mask is one query against every key) and unequal ones.
    On CUDA with cuDNN's attention off, as parallel.start has it, so that the memory-efficient kernel
    runs: it refused the decode step's mask when that was broadcast along the keys."""
    model = tiny(device).eval()
    cudnn = device == 'cuda' and torch.backends.cuda.cudnn_sdp_enabled()
    if device == 'cuda':
        torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        for prompts in ([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 3], [4, 5, 6, 7, 8]]):
            cached = model.generate(prompts, 6, temperature=0)
            assert cached == model.generate(prompts, 6, temperature=0, use_cache=False)
    finally:
        if device == 'cuda':
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
