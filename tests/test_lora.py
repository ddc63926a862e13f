"""LoRA (model.py's last section): adapters that start as the base exactly, a base that never moves,
the reference as the base with the adapters off, peft on transformers' GPT-2 as the oracle (the same
A and B, the same logits; the exported adapter loads in peft), the merged export in transformers,
and, end to end, exact resume, DDP and FSDP against one process, and the mistakes in one line."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import export
from common import UserError
from conftest import ROOT
from model import (GPT, GPTConfig, BaseOf, add_lora, adapters_off, from_pretrained, load_model,
                   lora_base_sha256, merge_lora, save_pretrained, weights_sha256)


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))


def test_adapters_start_as_the_base_and_only_they_train():
    base = tiny()
    model = add_lora(tiny(), rank=4, alpha=8.0)
    idx = torch.randint(0, 64, (3, 16))
    assert torch.equal(model(idx), base(idx))  # B = 0: exactly the base
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"transformer.h.{i}.{layer}.lora.{m}" for i in range(2) for m in 'AB'
                       for layer in ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj')}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), 'cpu')
    assert sum(len(g['params']) for g in optimizer.param_groups) == len(trained)  # AdamW holds only them
    for _ in range(2):
        model(idx)[..., 0].mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and p.grad is None, n  # bit-identical, no gradient
    assert not torch.equal(model(idx), base(idx))  # the adapters moved
    with adapters_off(model):
        assert torch.equal(model(idx), base(idx))  # and off, the model is its base again
    assert torch.equal(BaseOf(model)(idx), base(idx))
    assert lora_base_sha256(model) == weights_sha256(base)


def test_targets_pick_the_layers_and_a_wrong_one_is_named():
    model = add_lora(tiny(), rank=2, alpha=2.0, targets='attn.c_proj')
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        f"transformer.h.{i}.attn.c_proj.lora.{m}" for i in range(2) for m in 'AB']
    with pytest.raises(UserError, match=r"^lora_targets='c_attn,q_proj': q_proj is not a layer LoRA adapts here; "
                                        r"choose among c_attn, c_proj, attn.c_proj, c_fc, mlp.c_proj$"):
        add_lora(tiny(), rank=2, alpha=2.0, targets='c_attn,q_proj')


def with_random_adapters(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)  # B too: an update that changes the logits
    return model


def test_peft_on_transformers_gives_our_logits_and_the_merged_export_too(hf_dir, tmp_path):
    """The same A and B, written as a peft adapter (export.py's), loaded by peft onto transformers'
    GPT2LMHeadModel: the logits agree (fp32, 1e-5); merged into the weights and saved in the hub
    layout, transformers alone gives them as well."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    ours = with_random_adapters(add_lora(from_pretrained(hf_dir), rank=4, alpha=8.0, dropout=0.1)).eval()
    export.save_peft_adapter(ours, str(tmp_path / 'adapter'), dict(
        lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, lora_targets='c_attn,c_proj,c_fc', init_from=hf_dir))
    theirs = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hf_dir), str(tmp_path / 'adapter')).eval()
    idx = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        logits = ours(idx)
        torch.testing.assert_close(theirs(idx).logits, logits, atol=1e-5, rtol=0)
        with adapters_off(ours):
            assert not torch.allclose(ours(idx), logits, atol=1e-3)  # the adapters do change them
        save_pretrained(merge_lora(ours), str(tmp_path / 'merged'))
        merged = GPT2LMHeadModel.from_pretrained(str(tmp_path / 'merged')).eval()
        torch.testing.assert_close(merged(idx).logits, logits, atol=1e-5, rtol=0)


def test_a_lora_checkpoint_holds_the_adapters_and_needs_its_base(tmp_path):
    """A LoRA run's ckpt.pt holds its adapters and the base's fingerprint, not the base: loaded, the
    base comes from the run's init_from, and a base whose weights changed is refused."""
    import checkpoint
    import parallel
    base_dir = tmp_path / 'base'
    checkpoint.write({'model_args': tiny().config.__dict__, 'model': tiny().state_dict()}, str(base_dir / 'ckpt.pt'))
    model = with_random_adapters(load_model(str(base_dir), lora=(4, 8.0, 0.0, 'c_attn,c_proj,c_fc')))
    optimizer = model.configure_optimizers(0.0, 1e-3, (0.9, 0.99), 'cpu')
    state, _ = parallel.full_state(model, optimizer, True)
    assert set(state) == {'lora_base_sha256'} | {n for n, p in model.named_parameters() if p.requires_grad}
    config = dict(init_from=str(base_dir), lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                  lora_targets='c_attn,c_proj,c_fc')
    run = tmp_path / 'run'
    checkpoint.write({'model_args': model.config.__dict__, 'model': state, 'config': config}, str(run / 'ckpt.pt'))
    idx = torch.randint(0, 64, (2, 16))
    resumed = load_model('resume', out_dir=str(run))
    assert torch.equal(resumed(idx), model(idx)) and lora_base_sha256(resumed) == lora_base_sha256(model)
    merged = load_model(str(run))  # as sample.py and tools/evaluate.py take it: a plain GPT
    assert not any(p.requires_grad is False for p in merged.parameters())
    torch.testing.assert_close(merged(idx), model(idx), atol=1e-5, rtol=0)
    for wrong, what in (({'lora_rank': 2}, "size mismatch"), ({'lora_targets': 'c_attn'}, "attn.c_proj.lora.A is not one of them")):
        checkpoint.write({'model_args': model.config.__dict__, 'model': state, 'config': {**config, **wrong}},
                         str(tmp_path / 'odd' / 'ckpt.pt'))
        with pytest.raises(UserError, match=rf"odd/ckpt.pt: its adapters do not fit its config's LoRA settings .*{what}"):
            load_model('resume', out_dir=str(tmp_path / 'odd'))
    checkpoint.write({'model_args': tiny().config.__dict__, 'model': tiny(seed=1).state_dict()}, str(base_dir / 'ckpt.pt'))
    with pytest.raises(UserError, match=rf"^{run}/ckpt.pt holds LoRA adapters for the base {base_dir}, whose weights "
                                        r"changed since the run started \(sha256 differs\)"):
        load_model('resume', out_dir=str(run))


# ---------------------------------------------------------------- end to end, as users run it

COMMON = ['--device=cpu', '--dtype=float32', '--dataset=synthetic', '--max_length=64', '--max_prompt_length=32',
          '--eval_iters=2', '--log_interval=1', '--lora_rank=4', '--learning_rate=1e-3', '--warmup_iters=0']
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def run(script, *args, launcher=None):
    result = subprocess.run((launcher or [sys.executable]) + [script, *COMMON, *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def rows(out):
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.endswith(('_per_sec', 'mfu', 'ms_per_iter', 'eta_min'))} for line in f]


def adapters(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['model']


@pytest.fixture(scope='module')
def sft_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('sft'))
    subprocess.run([sys.executable, 'sft.py', '--device=cpu', '--dtype=float32', '--dataset=synthetic',
                    '--max_length=64', '--max_prompt_length=32', '--init_from=scratch', '--n_layer=2', '--n_head=2',
                    '--n_embd=32', '--block_size=64', f'--out_dir={out}', '--max_iters=40', '--learning_rate=3e-3',
                    '--eval_interval=40', '--eval_iters=2', '--batch_size=8'], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    return out


@pytest.mark.slow
def test_lora_dpo_starts_at_ln2_resumes_exactly_and_ranks_equal_one_process(sft_dir, tmp_path):
    """The reference is the SFT model with the adapters off, so the first loss is ln 2 with margins 0;
    ckpt.pt holds only the adapters; a resumed run equals an uninterrupted one; 2 DDP ranks and 2 FSDP
    ranks equal one process accumulating 2 (without dropout, whose masks are each rank's own)."""
    args = [f'--init_from={sft_dir}', '--batch_size=4', '--eval_interval=2', '--lora_dropout=0.1']
    whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
    run('dpo.py', *args, '--gradient_accumulation_steps=2', '--max_iters=4', f'--out_dir={whole}')
    first = rows(whole)[0]
    assert first['eval/loss'] == pytest.approx(math.log(2), abs=1e-6) and first['eval/rewards/margins'] == 0
    assert all(k.startswith(('lora_base', 'transformer.h.')) and '.lora.' in k or k == 'lora_base_sha256'
               for k in adapters(whole))
    run('dpo.py', *args, '--gradient_accumulation_steps=2', '--max_iters=2', f'--out_dir={parts}')
    run('dpo.py', '--init_from=resume', f'--out_dir={parts}', '--max_iters=4')
    assert rows(parts) == rows(whole)
    for (k, a), b in zip(adapters(whole).items(), adapters(parts).values()):
        assert torch.equal(a, b), k
    # across layouts without dropout: each rank draws its own dropout masks, one process another stream
    args, one = args[:-1], str(tmp_path / 'one')
    run('dpo.py', *args, '--gradient_accumulation_steps=2', '--max_iters=4', f'--out_dir={one}')
    for layout, extra in (('ddp', []), ('fsdp', ['--fsdp=True'])):
        out = str(tmp_path / layout)
        run('dpo.py', *args, '--gradient_accumulation_steps=1', '--max_iters=4', f'--out_dir={out}', *extra,
            launcher=TORCHRUN)
        for a, b in zip(rows(out), rows(one), strict=True):
            assert a == pytest.approx(b, abs=1e-5), layout
        for (k, a), b in zip(adapters(out).items(), adapters(one).values()):
            assert torch.allclose(a, b, atol=1e-5), (layout, k)
    sampled = subprocess.run([sys.executable, 'sample.py', '--init_from=resume', f'--out_dir={whole}', '--device=cpu',
                              '--num_samples=2', '--max_new_tokens=8'], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert sampled.returncode == 0 and 'sample 2/2' in sampled.stdout, sampled.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize('script, args, message', [  # LoRA's ranges and conflicts: tests/test_configs.py
    ('dpo.py', ['--lora_targets=c_attn,wte'], "error: lora_targets='c_attn,wte': wte is not a layer LoRA adapts here"),
])
def test_lora_mistakes_stop_with_one_line(script, args, message, sft_dir, tmp_path):
    result = subprocess.run([sys.executable, script, *COMMON, f'--init_from={sft_dir}', f'--out_dir={tmp_path / "no"}',
                             *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1
