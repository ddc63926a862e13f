"""sample.py end to end, as users run it, on a tiny model with GPT-2's vocabulary."""

import re
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


def test_samples_come_in_batches_that_fit_and_a_batch_that_cannot_is_refused(tiny_dirs):
    """Greedy samples drawn 2 at a time equal those drawn 5 at once; a batch whose KV cache and logits
    would not fit in memory (here 10**8 samples at a time) is refused before any work, with what it needs."""
    common = ['--init_from=resume', f'--out_dir={tiny_dirs / "out"}', '--num_samples=5', '--max_new_tokens=6',
              '--temperature=0', '--start=Hello', '--dtype=float32']
    together, apart = run_sample(*common), run_sample(*common, '--batch_size=2')
    assert together.returncode == 0 and apart.returncode == 0, together.stderr + apart.stderr
    samples = lambda out: out.split('sample 1/5')[1].rsplit('tokens in', 1)[0]
    assert samples(together.stdout) == samples(apart.stdout) and 'sample 5/5' in apart.stdout
    huge = run_sample('--init_from=resume', f'--out_dir={tiny_dirs / "out"}', f'--num_samples={10 ** 8}',
                      f'--batch_size={10 ** 8}', '--max_new_tokens=1')
    assert huge.returncode != 0
    assert re.fullmatch(r"error: batch_size=100000000 samples of up to 2 tokens at a time need about [\d.]+ GB \(KV "
                        r"cache and logits\), and cpu has [\d.]+ GB free: lower --batch_size \(about \d+ fits\)",
                        huge.stderr.strip().splitlines()[-1]), huge.stderr[-2000:]


def test_a_prompt_file_that_is_not_utf8_is_named(tiny_dirs, tmp_path):
    (tmp_path / 'latin1.txt').write_bytes(b'caf\xe9')
    result = run_sample('--init_from=resume', f'--out_dir={tiny_dirs / "out"}', f'--start=FILE:{tmp_path / "latin1.txt"}')
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: the prompt file {tmp_path / 'latin1.txt'} is not UTF-8 text (byte 0xe9 at offset 3)"
