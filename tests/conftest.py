"""Shared fixtures and helpers: the repository root, tiny random GPT-2s written to disk by
transformers (the test-only oracle) in both key layouts found on the hub, and a few tokenized pairs.
(pytest.ini puts the repository root on the import path.)"""

import json
import os
import shutil

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where the scripts are run from

TINY = dict(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=128, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope='session')
def hf_dir(tmp_path_factory):
    """A tiny GPT-2 as transformers' save_pretrained writes it ('transformer.' keys, no lm_head)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY))
    with torch.no_grad():  # larger weights than GPT-2's init, so every detail moves the logits
        for name, p in model.named_parameters():
            if p.dim() == 1:  # biases and LayerNorms start at 0 and 1: randomise them too
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp('hf_layout')
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope='session')
def official_dir(hf_dir, tmp_path_factory):
    """The same weights in the official repos' layout: no prefix, causal-mask buffers present."""
    from safetensors.torch import load_file, save_file
    tensors = {k.removeprefix('transformer.'): v for k, v in load_file(os.path.join(hf_dir, 'model.safetensors')).items()}
    n = TINY['n_positions']
    for layer in range(TINY['n_layer']):
        tensors[f'h.{layer}.attn.bias'] = torch.ones(n, n).tril().view(1, 1, n, n)
        tensors[f'h.{layer}.attn.masked_bias'] = torch.tensor(-1e4)
    path = tmp_path_factory.mktemp('official_layout')
    save_file(tensors, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
    shutil.copy(os.path.join(hf_dir, 'config.json'), path)
    return str(path)


@pytest.fixture(scope='session')
def hf_model(hf_dir):
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(hf_dir).eval()


def edit_json(path, **changes):
    with open(path) as f:
        d = json.load(f)
    d.update(changes)
    with open(path, 'w') as f:
        json.dump(d, f)


@pytest.fixture(scope='session')
def varied_pairs():
    """Four tokenized pairs of very different lengths, so that packing puts several sequences in a row."""
    from data import tokenize_pairs
    words = 'the cat sat on a mat and then it ran off to see what the dog was doing there'.split()
    return tokenize_pairs([{'prompt': ' '.join(words[:2 + 5 * i]), 'chosen': ' ' + ' '.join(words[i:i + 1 + i % 3]),
                            'rejected': ' ' + ' '.join(words[:1 + 2 * i])} for i in range(4)], 64, 32)
