"""sample.py end to end, as users run it, on a tiny model with GPT-2's vocabulary."""

import subprocess
import sys

import pytest
import torch

import checkpoint
from model import GPT, GPTConfig, save_pretrained
from conftest import ROOT



def run_sample(*args):
    return subprocess.run([sys.executable, 'sample.py', '--device=cpu', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def tiny_dirs(tmp_path_factory):
    torch.manual_seed(0)
    args = dict(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)
    model = GPT(GPTConfig(**args))
    root = tmp_path_factory.mktemp('sample')
    save_pretrained(model, root / 'hub')
    checkpoint.write({'model_args': args, 'model': model.state_dict()}, str(root / 'out' / 'ckpt.pt'))
    (root / 'prompt.txt').write_text('Human: hi\n\nAssistant:')
    return root


@pytest.mark.slow
def test_samples_from_a_hub_directory_and_a_checkpoint(tiny_dirs):
    hub = run_sample(f'--init_from={tiny_dirs / "hub"}', '--num_samples=2', '--max_new_tokens=8',
                     '--temperature=0', f'--start=FILE:{tiny_dirs / "prompt.txt"}', '--dtype=float32')
    assert hub.returncode == 0, hub.stderr
    assert 'sample 1/2' in hub.stdout and 'sample 2/2' in hub.stdout
    assert hub.stdout.count('Human: hi\n\nAssistant:') == 2
    ckpt = run_sample('--init_from=resume', f'--out_dir={tiny_dirs / "out"}', '--num_samples=2',
                      '--max_new_tokens=8', '--temperature=0', f'--start=FILE:{tiny_dirs / "prompt.txt"}',
                      '--dtype=float32')
    assert ckpt.returncode == 0, ckpt.stderr
    # the same weights, greedy: the same text
    samples = lambda out: out.split('sample 1/2')[1].rsplit('tokens in', 1)[0]  # without the timing
    assert samples(hub.stdout) == samples(ckpt.stdout)


def test_user_mistakes_give_one_line(tiny_dirs):
    wrong_key = run_sample('--temprature=0.5')
    assert wrong_key.returncode != 0
    assert wrong_key.stderr.strip() == ("config error: argument --temprature=0.5: unknown config key "
                                        "'temprature' (did you mean 'temperature'?)")
    no_ckpt = run_sample('--init_from=resume', f'--out_dir={tiny_dirs / "nothing"}')
    assert no_ckpt.returncode != 0
    assert no_ckpt.stderr.strip().startswith(f"error: no checkpoint at {tiny_dirs / 'nothing' / 'ckpt.pt'}: name the "
                                             "model to sample from, --init_from=gpt2")
