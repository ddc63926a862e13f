"""bench.py runs (tiny model, one step each) and reports what it promises; no timing is asserted."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def own_cache(tmp_path):
    """The environment of a bench.py that measures the CPU's peak under load: its cache in tmp_path, so
    that the repository's data_cache/peak_flops.json keeps a real measurement."""
    return {**os.environ, 'NANODPO_DATA_CACHE': str(tmp_path)}


def test_the_padding_report_by_hand(tmp_path):
    """bench.py --padding=True on a 2-pair file: batches of the 2 pairs there are (not of the
    batch_size asked for), and the padding of the rows by hand."""
    lines = [{'prompt': ' a' * 3, 'chosen': ' b', 'rejected': ' c' * 3},
             {'prompt': ' a', 'chosen': ' b' * 2, 'rejected': ' c'}]
    path = tmp_path / 'pairs.jsonl'
    path.write_text(''.join(json.dumps(line) + '\n' for line in lines))
    result = subprocess.run([sys.executable, 'tools/bench.py', '--padding=True', '--dataset=jsonl',
                             f'--data_path={path}', '--batch_size=64', f'--cache_dir={tmp_path}'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'DPO batches of 2 pairs:' in result.stdout
    # rows: prompt + response + <|endoftext|>, less the last token: 3+1+1-1, 3+3+1-1, 1+2+1-1, 1+1+1-1
    rows = [4, 6, 3, 2]
    assert f"padded rows: {1 - sum(rows) / (4 * max(rows)):.1%} padding" in result.stdout


def test_a_padding_report_of_data_it_cannot_get_says_so_in_one_line(tmp_path):
    """HH without internet (and its hub cache empty): the hub's error in one line, no traceback."""
    result = subprocess.run([sys.executable, 'tools/bench.py', '--padding=True', '--dataset=hh',
                             f'--cache_dir={tmp_path}'], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf')})
    assert result.returncode == 1
    assert ("\nerror: could not get harmless-base/train.jsonl.gz of the dataset Anthropic/hh-rlhf from the "
            "Hugging Face hub or its cache\n") in result.stderr, result.stderr
    assert 'Traceback' not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize('pack', [False, True])
def test_bench_reports_every_step(pack, tmp_path):
    result = subprocess.run([sys.executable, 'tools/bench.py', '--model=tiny', '--steps=1', '--warmup_steps=0',
                             '--sample_tokens=4', '--what=dpo,dpo_precomputed,sft,sample', '--device=cpu',
                             '--dtype=float32', '--batch_size=2', f'--pack={pack}'],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=own_cache(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert [s['step'] for s in report['steps']] == ['dpo', 'dpo_precomputed', 'sft', 'sample with KV cache',
                                                    'sample without KV cache']
    assert all(s['tokens_per_sec'] > 0 for s in report['steps'])
    assert all(0 < s['mfu'] and s['pairs_per_sec'] > 0 for s in report['steps'][:3])
    pad = report['padding']
    assert 0 <= pad['grouped_packed'] <= pad['grouped'] < pad['plain'] < 1  # grouping by length pads less, packing less still
    assert pad['plain_packed'] < pad['plain']


def test_cpu_allocation_peak_by_hand():
    import torch
    from bench import cpu_allocation_peak
    before = torch.empty(5_000_000, dtype=torch.uint8)  # alive before: not counted

    def steps():
        a = torch.empty(4_000_000, dtype=torch.uint8)
        b = torch.empty(8_000_000, dtype=torch.uint8)  # 12 MB held: the peak
        del a
        c = torch.empty(2_000_000, dtype=torch.uint8)  # 10 MB
        del b, c
        return 'done'
    assert cpu_allocation_peak(steps) == ('done', 12_000_000)
    assert cpu_allocation_peak(lambda: before.numel()) == (5_000_000, 0)


@pytest.mark.slow
def test_bench_bytes_per_rank_halve_under_fsdp(tmp_path):
    """On 2 gloo ranks, in float32 (no autocast copies): a DDP rank holds 4 bytes a parameter of
    weights, 4 of the reference, 4 of gradients and 8 of AdamW's two moments, counted from the
    tensors themselves; an FSDP rank holds half of each (the shards of an odd-sized row are one
    row apart, so about half)."""
    def bytes_per_param(fsdp):
        result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                                 'tools/bench.py', '--model=tiny', '--what=dpo', '--steps=1', '--warmup_steps=0', '--device=cpu',
                                 '--dtype=float32', '--batch_size=2', '--lengths=16,16', f'--fsdp={fsdp}'],
                                cwd=ROOT, capture_output=True, text=True, timeout=600, env=own_cache(tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        return report['steps'][0]['bytes_per_param']
    ddp, fsdp = bytes_per_param(False), bytes_per_param(True)
    assert ddp == pytest.approx({'weights': 4, 'reference': 4, 'gradients': 4, 'optimizer': 8, 'weight copies': 0})
    assert fsdp == pytest.approx({k: v / 2 for k, v in ddp.items()}, rel=1e-3)


@pytest.mark.slow
def test_a_lora_dpo_step_holds_no_reference_and_state_only_for_the_adapters(tmp_path):
    """bench.py --lora_rank=2: the reference is the policy with its adapters off (0 bytes of its own),
    gradients and AdamW's moments exist for the adapters only, and the memory plan has LoRA's rows."""
    result = subprocess.run([sys.executable, 'tools/bench.py', '--model=tiny', '--what=dpo', '--steps=1',
                             '--warmup_steps=0', '--device=cpu', '--dtype=float32', '--batch_size=2', '--lora_rank=2',
                             '--memory_plan=True'], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=own_cache(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    per_param = json.loads(result.stdout.strip().splitlines()[-1])['steps'][0]['bytes_per_param']
    assert per_param['reference'] == 0 and per_param['weights'] == 4  # one float32 copy of the weights
    assert 0 < per_param['gradients'] < 0.5 and 0 < per_param['optimizer'] < 1  # the adapters' only (full: 4 and 8)
    assert '| gpt2-xl | LoRA r=2: adapters off |' in result.stdout
