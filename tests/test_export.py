"""export.py: a run's checkpoint leaves the project as a hub-layout directory that transformers loads
as it is, model and tokenizer, with our logits and our token ids."""

import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import checkpoint
from conftest import ROOT
from data import encode
from model import GPT, GPTConfig


@pytest.mark.slow
def test_exported_checkpoint_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()  # GPT-2's vocabulary
    checkpoint.write({'model_args': asdict(ours.config), 'model': ours.state_dict()}, str(tmp_path / 'run' / 'ckpt.pt'))
    result = subprocess.run([sys.executable, 'tools/export.py', f'--init_from={tmp_path / "run"}', f'--to={tmp_path / "hf"}'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    model, tokenizer = (cls.from_pretrained(str(tmp_path / 'hf')) for cls in (AutoModelForCausalLM, AutoTokenizer))
    text = "The reviewer liked the acting, less so the 2 hour plot."
    ids = tokenizer.encode(text)
    assert ids == encode(text) and tokenizer.eos_token_id == 50256
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(torch.tensor([ids])).logits, ours(torch.tensor([ids])), atol=1e-5, rtol=1e-5)
    assert sorted(os.listdir(tmp_path / 'hf')) == ['config.json', 'generation_config.json', 'merges.txt',
                                                   'model.safetensors', 'special_tokens_map.json',
                                                   'tokenizer_config.json', 'vocab.json']
    umask = os.umask(0)
    os.umask(umask)  # every file readable as the user's other files are (safetensors alone writes 0600)
    assert {oct(os.stat(tmp_path / 'hf' / name).st_mode & 0o777) for name in os.listdir(tmp_path / 'hf')} == {oct(0o666 & ~umask)}


@pytest.mark.slow
def test_an_export_never_mixes_with_what_was_there(tmp_path):
    """Exporting into a directory that holds files (an older export with a tokenizer.json, after
    which AutoTokenizer fails) is refused; with overwrite=True the new export replaces it whole."""
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16))
    checkpoint.write({'model_args': asdict(ours.config), 'model': ours.state_dict()}, str(tmp_path / 'run' / 'ckpt.pt'))
    hf = tmp_path / 'hf'
    hf.mkdir()
    (hf / 'tokenizer.json').write_text('{"stale": true}')
    export = [sys.executable, 'tools/export.py', f'--init_from={tmp_path / "run"}', f'--to={hf}']
    result = subprocess.run(export, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {hf} already exists and is not an empty directory: choose another "
                                     "--to, or replace it whole with --overwrite=True")
    assert os.listdir(hf) == ['tokenizer.json']
    result = subprocess.run(export + ['--overwrite=True'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(hf)) == ['config.json', 'generation_config.json', 'merges.txt', 'model.safetensors',
                                      'special_tokens_map.json', 'tokenizer_config.json', 'vocab.json']
    assert sorted(os.listdir(tmp_path)) == ['hf', 'run']  # nothing staged or old left beside it
