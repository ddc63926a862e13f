"""runtime.py: dtype choice, atomic checkpoints, and loading a model from a checkpoint."""

import os

import pytest
import torch

import runtime
from model import GPT, GPTConfig, LoadError


def test_dtype_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(runtime, 'cpu_has_native_bf16', lambda: True)
    assert runtime.resolve_dtype('auto', 'cpu') == 'bfloat16'
    monkeypatch.setattr(runtime, 'cpu_has_native_bf16', lambda: False)
    assert runtime.resolve_dtype('auto', 'cpu') == 'float32'
    assert runtime.resolve_dtype('float16', 'cpu') == 'float16'  # asked for: given
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: False)
    assert runtime.resolve_dtype('auto', 'cuda') == 'float16'
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16; got 'fp8'"):
        runtime.resolve_dtype('fp8', 'cpu')


def test_a_crash_while_saving_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    runtime.save_checkpoint({'iter_num': 1, 'w': torch.ones(3)}, path)
    real_save = torch.save
    def crash(obj, f):
        real_save({'partial': torch.zeros(1000)}, f)
        raise KeyboardInterrupt  # killed half-way
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        runtime.save_checkpoint({'iter_num': 2, 'w': torch.zeros(3)}, path)
    monkeypatch.undo()
    assert runtime.load_checkpoint(path)['iter_num'] == 1
    assert os.listdir(tmp_path) == ['ckpt.pt']  # no temporary file left behind


def test_load_model_resume_and_errors(tmp_path):
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=8)
    model = GPT(GPTConfig(**args))
    runtime.save_checkpoint({'model_args': args, 'model': model.state_dict()}, str(tmp_path / 'ckpt.pt'))
    loaded = runtime.load_model('resume', str(tmp_path))
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(LoadError, match=f"no checkpoint at {tmp_path / 'empty' / 'ckpt.pt'}"):
        runtime.load_model('resume', str(tmp_path / 'empty'))
    (tmp_path / 'junk').mkdir()
    (tmp_path / 'junk' / 'ckpt.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(LoadError, match='is not a readable checkpoint'):
        runtime.load_model('resume', str(tmp_path / 'junk'))
