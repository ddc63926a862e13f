"""model.py against transformers' GPT2LMHeadModel, against itself by a second code path, and
against hand-computed values."""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from common import UserError
from conftest import TINY, edit_json
from model import GPT, GPTConfig, TargetLogProbs, from_pretrained, load_model, plain_target_logprobs, sample_next_token, save_pretrained, top_k_filter, top_p_filter


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=32, vocab_size=96, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


# ---------------------------------------------------------------- transformers as the oracle

@pytest.mark.parametrize('layout', ['hf_dir', 'official_dir'])
def test_logits_equal_transformers_in_both_layouts(layout, hf_model, request):
    ours = from_pretrained(request.getfixturevalue(layout)).eval()
    idx = torch.randint(0, TINY['vocab_size'], (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(idx).logits
        got = ours(idx)
    assert got.shape == (3, 40, TINY['vocab_size'])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_greedy_generation_equals_transformers(hf_dir, hf_model):
    ours = from_pretrained(hf_dir).eval()
    prompts = torch.randint(1, TINY['vocab_size'], (2, 6), generator=torch.Generator().manual_seed(2))
    expected = hf_model.generate(prompts, max_new_tokens=25, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[:, 6:]
    got = ours.generate(prompts, max_new_tokens=25, temperature=0, eos_token_id=None)
    assert got == expected.tolist()


def test_save_pretrained_loads_in_transformers_with_same_logits(tmp_path):
    from transformers import GPT2LMHeadModel
    ours = tiny_gpt()
    save_pretrained(ours, tmp_path)
    theirs, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
    idx = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs.eval()(idx).logits, atol=1e-4, rtol=0)
    again = from_pretrained(str(tmp_path))  # and back: the exact same tensors
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert sorted(os.listdir(tmp_path)) == ['config.json', 'model.safetensors']  # no temp files left


def test_hub_download_path_reads_the_hub_cache(hf_dir, tmp_path, monkeypatch, capsys):
    """from_pretrained('gpt2') goes through hf_hub_download; offline, it finds the files in a hub
    cache laid out by the test exactly as huggingface_hub lays it out."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    repo = tmp_path / 'models--openai-community--gpt2'
    snapshot = repo / 'snapshots' / ('0' * 40)
    snapshot.mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('0' * 40)
    for name in ('config.json', 'model.safetensors'):
        shutil.copy(os.path.join(hf_dir, name), snapshot)
    from_hub = from_pretrained('gpt2', cache_dir=str(tmp_path))
    from_dir = from_pretrained(hf_dir)
    for a, b in zip(from_hub.state_dict().values(), from_dir.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(UserError) as error:
        from_pretrained('gpt2-medium', cache_dir=str(tmp_path))
    first, todo, detail = str(error.value).splitlines()  # a short line first, then what to do, then why
    assert first == 'could not get config.json of openai-community/gpt2-medium from the Hugging Face hub or its cache'
    assert todo == ('  without internet: pass a local hub-layout directory, or fill the hub cache where there is '
                    'internet and set HF_HUB_OFFLINE=1')
    assert detail.startswith("  the hub's error: ")
    assert "downloading config.json of openai-community/gpt2-medium from the Hugging Face hub ..." in capsys.readouterr().err
    # online (HF_HUB_OFFLINE unset), files in the cache are taken from it without asking the hub anything:
    # an unreachable hub costs no time
    import huggingface_hub.file_download
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    def no_network(*args, **kwargs):
        raise AssertionError('the hub was asked although the cache holds the files')
    monkeypatch.setattr(huggingface_hub.file_download, 'get_hf_file_metadata', no_network)
    for a, b in zip(from_pretrained('gpt2', cache_dir=str(tmp_path)).state_dict().values(), from_dir.state_dict().values()):
        assert torch.equal(a, b)



def test_weights_from_the_hub_cache_are_checked_against_their_blob_name(hf_dir, tmp_path, monkeypatch):
    """The hub cache names a large file's blob by the sha256 of its bytes: the first read checks them
    (and records it, so later reads cost nothing); a damaged blob stops in one line that says what to delete."""
    import hashlib
    import huggingface_hub.constants
    import common
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(common, 'DATA_CACHE_DIR', str(tmp_path / 'data_cache'))
    repo = tmp_path / 'hub' / 'models--openai-community--gpt2'
    snapshot, blobs = repo / 'snapshots' / ('0' * 40), repo / 'blobs'
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('0' * 40)
    shutil.copy(os.path.join(hf_dir, 'config.json'), snapshot)  # small files: named by git's sha1, not checked
    weights = open(os.path.join(hf_dir, 'model.safetensors'), 'rb').read()
    blob = blobs / hashlib.sha256(weights).hexdigest()
    blob.write_bytes(weights)
    os.symlink(os.path.relpath(blob, snapshot), snapshot / 'model.safetensors')
    from_pretrained('gpt2', cache_dir=str(tmp_path / 'hub'))
    record = json.loads((tmp_path / 'data_cache' / 'verified_blobs.json').read_text())
    assert list(record) == [blob.name]
    damaged = bytearray(weights)
    damaged[-1] ^= 1  # one bit of the last weight: still a readable safetensors file
    blob.write_bytes(bytes(damaged))
    with pytest.raises(UserError, match=rf"model.safetensors is damaged in the hub cache: the sha256 of its bytes is "
                                        rf"not {blob.name[:16]}\.\.\., which the hub names it by .*; delete {blob} and"):
        from_pretrained('gpt2', cache_dir=str(tmp_path / 'hub'))

# ---------------------------------------------------------------- loading errors

def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def rewrite_weights(path, edit):
    from safetensors.torch import load_file, save_file
    file = os.path.join(path, 'model.safetensors')
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_missing_key_is_named(official_dir, tmp_path):
    path = copy_dir(official_dir, tmp_path / 'm')
    rewrite_weights(path, lambda t: t.pop('h.1.mlp.c_fc.bias'))
    with pytest.raises(UserError, match=r"model.safetensors: missing key 'h\.1\.mlp\.c_fc\.bias'"):
        from_pretrained(path)


def test_unexpected_key_is_named(hf_dir, tmp_path):
    path = copy_dir(hf_dir, tmp_path / 'm')
    rewrite_weights(path, lambda t: t.update({'transformer.h.0.attn.rotary.weight': torch.zeros(2)}))
    with pytest.raises(UserError, match=r"unexpected key 'transformer\.h\.0\.attn\.rotary\.weight'"):
        from_pretrained(path)


def test_shape_mismatch_is_named(hf_dir, tmp_path):
    path = copy_dir(hf_dir, tmp_path / 'm')
    edit_json(os.path.join(path, 'config.json'), n_positions=32)  # the file has 64 positions
    with pytest.raises(UserError, match=r"key 'transformer\.wpe\.weight' has shape \(64, 32\).*\(32, 32\)"):
        from_pretrained(path)


def test_missing_file_and_unknown_name(hf_dir, tmp_path):
    path = copy_dir(hf_dir, tmp_path / 'm')
    os.remove(os.path.join(path, 'model.safetensors'))
    with pytest.raises(UserError, match=r"model\.safetensors does not exist"):
        from_pretrained(path)
    with pytest.raises(UserError, match="'./no/such/dir' is not a directory"):
        from_pretrained('./no/such/dir')


def test_a_run_directory_without_its_checkpoint_says_so(tmp_path):
    run_dir = tmp_path / 'out-sft'  # a run stopped before its first save: metrics, no ckpt.pt
    run_dir.mkdir()
    (run_dir / 'metrics.jsonl').write_text('{}\n')
    with pytest.raises(UserError, match=rf"^{run_dir} holds no model: neither a run's ckpt\.pt"):
        load_model(str(run_dir))


def test_unsupported_config_is_refused(hf_dir, tmp_path):
    path = copy_dir(hf_dir, tmp_path / 'm')
    edit_json(os.path.join(path, 'config.json'), activation_function='relu')
    with pytest.raises(UserError, match="activation_function='relu' is not supported"):
        from_pretrained(path)


def test_a_shape_that_cannot_be_built_is_named(hf_dir, tmp_path):
    path = copy_dir(hf_dir, tmp_path / 'm')
    edit_json(os.path.join(path, 'config.json'), n_head=5)  # 32 channels do not split into 5 heads
    with pytest.raises(UserError, match=r"config\.json: n_embd=32 is not a multiple of n_head=5"):
        from_pretrained(path)
    edit_json(os.path.join(path, 'config.json'), n_head=4, n_layer=0)
    with pytest.raises(UserError, match=r"config\.json: n_layer=0 must be a whole number >= 1"):
        from_pretrained(path)


# ---------------------------------------------------------------- log-probs

def test_logprobs_masked_zero_and_equal_log_softmax():
    model = tiny_gpt()
    idx = torch.randint(0, 96, (3, 12))
    targets = torch.randint(0, 96, (3, 12))
    targets[0, :5] = -1   # a prompt
    targets[1, 9:] = -1   # padding
    targets[2, :] = -1    # nothing at all
    with torch.no_grad():
        got = model(idx, targets)
        logp = F.log_softmax(model(idx).double(), dim=-1)  # (B, T, V) by hand, in float64
    assert got.shape == (3, 12)
    masked = targets == -1
    assert torch.all(got[masked] == 0.0)
    expected = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(got[~masked].double(), expected[~masked], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- generation: cache, batching, filters

def test_kv_cache_logits_equal_recompute():
    model = tiny_gpt()
    idx = torch.randint(0, 96, (2, 20))
    from model import KVCache
    with torch.no_grad():
        full = model(idx)  # (2, 20, V)
        cache = KVCache(model.config.n_layer, 20)
        steps = [model(idx[:, :7], kv_cache=cache)]           # a prompt of 7 at once
        steps.append(model(idx[:, 7:10], kv_cache=cache))     # a chunk of 3 after the cache
        steps += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(10, 20)]  # then one by one
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_one_row_steps_without_onednn_equal_with_it():
    """generate's one-row cached steps on a CPU run without oneDNN (its bf16 matrix-vector products
    are slower): the same logits within bf16's rounding, and the switch is restored, even on an error."""
    from model import KVCache, onednn_off
    model = tiny_gpt(n_embd=512, n_head=4).to(torch.bfloat16)  # wide enough for oneDNN to take the matmuls
    idx = torch.randint(0, 96, (1, 12))
    steps = []
    for off in (False, True):
        cache = KVCache(model.config.n_layer, 12)
        with torch.no_grad():
            model(idx[:, :4], kv_cache=cache)
            with onednn_off(off):
                steps.append(torch.cat([model(idx[:, t:t + 1], kv_cache=cache) for t in range(4, 12)], dim=1).float())
    torch.testing.assert_close(steps[1], steps[0], atol=0.02, rtol=0.01)
    assert steps[0].abs().max() > 1  # logits of a size where bf16's rounding is what the tolerance allows
    before = torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError):
        with onednn_off():
            assert not torch.backends.mkldnn.enabled
            raise RuntimeError
    assert torch.backends.mkldnn.enabled == before


@pytest.mark.parametrize('prompt_len,new', [(5, 20), (10, 40)])  # the second slides past block_size 32
def test_sampling_with_cache_equals_without(prompt_len, new):
    model = tiny_gpt()
    prompts = torch.randint(0, 96, (3, prompt_len))
    runs = [model.generate(prompts, new, temperature=1.0, top_k=40, eos_token_id=None, use_cache=c,
                           generator=torch.Generator().manual_seed(5)) for c in (True, False)]
    assert runs[0] == runs[1]
    assert all(len(r) == new for r in runs[0])


def test_ragged_batch_equals_one_by_one():
    model = tiny_gpt()
    prompts = [torch.randint(0, 96, (n,)).tolist() for n in (3, 9, 1, 6)]
    batched = model.generate(prompts, 30, temperature=0, eos_token_id=None)
    alone = [model.generate([p], 30, temperature=0, eos_token_id=None)[0] for p in prompts]
    assert batched == alone
    # and the logits themselves, through the left-padded mask and position ids
    T = max(map(len, prompts))
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    valid = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts])
    with torch.no_grad():
        padded = model(idx, None, *model._positions_and_mask(valid, 0))[:, -1]
        for b, p in enumerate(prompts):
            torch.testing.assert_close(padded[b], model(torch.tensor([p]))[0, -1], atol=1e-5, rtol=0)


def test_generation_stops_each_row_at_eos():
    model = tiny_gpt()
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    free = model.generate(prompts, 12, temperature=0, eos_token_id=None)
    eos = free[0][3]  # a token row 0 draws as its 4th
    stopped = model.generate(prompts, 12, temperature=0, eos_token_id=eos)
    for row, out in zip(free, stopped):
        end = row.index(eos) + 1 if eos in row else len(row)
        assert out == row[:end]


def test_top_k_by_hand():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0], [0.0, -1.0, 5.0, 1.0]])
    inf = float('-inf')
    assert top_k_filter(logits, 2).tolist() == [[inf, 4.0, inf, 3.0], [inf, inf, 5.0, 1.0]]
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_p_by_hand():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    inf = float('-inf')
    # sorted: 0.5, 0.3, 0.15, 0.05; the mass before each: 0, 0.5, 0.8, 0.95
    kept = lambda p: (top_p_filter(logits, p) != inf).tolist()[0]
    assert kept(0.75) == [False, True, False, True]   # 0.5 + 0.3 reaches 0.75
    assert kept(0.85) == [True, True, False, True]    # needs 0.15 too
    assert kept(0.3) == [False, True, False, False]   # the top token alone
    assert kept(0.01) == [False, True, False, False]
    assert kept(0.0) == [False, True, False, False]   # never empty


@pytest.mark.parametrize('temperature', [1.0, 2.0])
def test_sample_next_token_draws_the_tempered_distribution(temperature):
    # the first and last tokens are filtered out, so an off-by-one in the CDF search would draw them
    probs = torch.tensor([0.0, 0.5, 0.2, 0.2, 0.1, 0.0], dtype=torch.float64)
    logits = probs.log().float()
    n = 200_000
    drawn = sample_next_token(logits.expand(n, -1), temperature, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=len(probs)).double()
    expected = (probs.log() / temperature).softmax(-1) * n  # T=2: 0.5, 0.2, 0.2, 0.1 -> sqrt, renormalised
    assert counts[0] == 0 and counts[-1] == 0
    sigma = (expected * (1 - expected / n)).sqrt()
    assert ((counts - expected).abs() <= 5 * sigma + 1e-9).all(), (counts, expected)


# ---------------------------------------------------------------- counting

def test_param_count_and_flops_by_hand():
    model = tiny_gpt()
    V, C, L, T = 96, 16, 2, 32
    per_layer = (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C) + 4 * C  # attn, proj, mlp, 2 LN
    N = V * C + L * per_layer + 2 * C  # token embedding (= lm_head), blocks, final LN; no positions
    assert model.num_params() == N
    assert model.num_params(non_embedding=False) == N + T * C
    assert model.flops(1, 1, T) == 6 * N + 12 * L * C * T  # a token with a target: 6N, plus attention
    assert model.flops(1, 1, T, backward=False) == 2 * N + 4 * L * C * T
    # 10 tokens of which 3 have a target: the vocabulary projection (2 V C per token) only for those 3
    assert model.flops(10, 3, T, backward=False) == 10 * (2 * (N - V * C) + 4 * L * C * T) + 3 * 2 * V * C


def test_flops_of_a_lora_step_by_hand():
    """With the base frozen, the backward computes the inputs' gradients (the forward again, and
    attention's twice) and weight gradients for the adapters only: 4N + 12 L C T + 2R for a token
    with a target, where a full step is 6N + 12 L C T."""
    from model import add_lora
    model = add_lora(tiny_gpt(), rank=2, alpha=4.0, targets='c_attn')
    V, C, L, T = 96, 16, 2, 32
    R = L * 2 * (C + 3 * C)  # each layer's c_attn: A (2, C) and B (3C, 2)
    N = model.num_params()  # the base's and the adapters'
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == R
    assert model.flops(1, 1, T) == 4 * N + 12 * L * C * T + 2 * R
    assert model.flops(1, 1, T, backward=False) == 2 * N + 4 * L * C * T
    model.requires_grad_(True)  # every weight trains: the full count again
    assert model.flops(1, 1, T) == 6 * N + 12 * L * C * T


def test_optimizer_groups_decay_only_matrices():
    model = tiny_gpt()
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type='cpu')
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    assert all(p.dim() == 2 for p in decay['params']) and all(p.dim() == 1 for p in no_decay['params'])
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == model.num_params(non_embedding=False)


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='no GPU'))])
def test_fused_optimizer_steps_like_the_plain_loop(device):
    """The fused AdamW (one kernel per tensor) must move the weights as torch's for-loop AdamW does."""
    fused, plain = tiny_gpt().to(device), tiny_gpt().to(device)
    plain.load_state_dict(fused.state_dict())
    opt = fused.configure_optimizers(weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.95), device_type=device)
    assert all(g['fused'] for g in opt.param_groups)
    reference = torch.optim.AdamW([{'params': g['params'], 'weight_decay': g['weight_decay']}
                                   for g in plain.configure_optimizers(0.1, 1e-2, (0.9, 0.95), device).param_groups],
                                  lr=1e-2, betas=(0.9, 0.95), foreach=False)
    # the same random gradients for both (the model's own would do, but its key bias has a zero
    # gradient made of rounding noise, which Adam's normalisation blows up to +-lr either way)
    g = torch.Generator(device).manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g, device=device) for p in fused.parameters()]
        for model, o in ((fused, opt), (plain, reference)):
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad.clone()
            o.step()
    for (name, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize('chunk', [8, 2 ** 21])  # 8 elements: one row a chunk; 2^21: all rows in one
def test_target_log_probs_gradients_by_finite_differences(chunk, monkeypatch):
    monkeypatch.setattr(TargetLogProbs, 'CHUNK', chunk)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])
    expected = torch.log_softmax(x @ weight.T, dim=-1)[torch.arange(5), targets]  # by indexing
    torch.testing.assert_close(plain_target_logprobs(x, weight, targets), expected)
    torch.testing.assert_close(TargetLogProbs.apply(x, weight, targets), expected)
    assert torch.autograd.gradcheck(lambda a, b: TargetLogProbs.apply(a, b, targets), (x, weight))


@pytest.mark.parametrize('pad_vocab', [False, True])  # True: as on CUDA, vocabulary 96 padded to 128
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_target_log_probs_equal_cross_entropy(dtype, pad_vocab, monkeypatch):
    """The fused projection + log-softmax gives cross_entropy's values and gradients (on the logits
    upcast to float32, as autocast runs it), in float32 and under bf16 autocast, with chunks."""
    monkeypatch.setattr(TargetLogProbs, 'CHUNK', 96 * 3)  # chunks of 3 rows
    monkeypatch.setattr(TargetLogProbs, 'PAD_VOCAB_ON', ('cuda', 'cpu') if pad_vocab else ())
    model = tiny_gpt()
    idx = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    targets = idx.roll(-1, dims=1)
    targets[0, :4] = targets[2, 7:] = -1
    results = []
    for fused in (True, False):
        model.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if fused:
                logp = model(idx, targets)
            else:
                keep = targets != -1
                logits = model.lm_head(model.hidden_states(idx)[keep]).float()
                logp = torch.zeros(targets.shape).masked_scatter(keep, -F.cross_entropy(logits, targets[keep], reduction='none'))
        (logp * torch.linspace(-1, 2, 30).view(3, 10)).sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
    (fused_logp, fused_grads), (plain_logp, plain_grads) = results
    assert fused_logp.dtype == torch.float32 and (fused_logp[targets == -1] == 0).all()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fused_logp, plain_logp, **tol)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_one_logits_copy_is_kept_for_backward(dtype):
    """Of the (targets, vocab) logits, autograd keeps exactly one copy, in the compute dtype: no float32
    log-softmax beside it (what F.cross_entropy would keep)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=5000, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 5000, (2, 16))
    targets = idx.roll(-1, dims=1)
    targets[:, :6] = -1  # 2 * 10 = 20 targets
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            model(idx, targets).sum().backward()
    logits_sized = [(n, d) for n, d in saved.values() if n >= 20 * 5000 * dtype.itemsize]
    assert logits_sized == [(20 * 5000 * dtype.itemsize, dtype)]
