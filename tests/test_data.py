"""data.py: HH splitting, truncation by hand, parallel tokenization, the cache, bad
input, and the hub code path on a local copy of the dataset repo's layout."""

import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from common import UserError
import data
from data import EOT_TOKEN, encode, load_dataset, split_transcripts, truncate
from conftest import ROOT



def write_jsonl(path, rows):
    with open(path, 'w') as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + '\n')
    return str(path)


# ---------------------------------------------------------------- HH splitting

def test_split_single_and_multi_turn():
    assert split_transcripts("\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: hi\n\nAssistant: go away") == \
        ("\n\nHuman: hi\n\nAssistant:", " hello", " go away")
    chosen = "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant: d, gladly."
    rejected = "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant: no."
    assert split_transcripts(chosen, rejected) == \
        ("\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant:", " d, gladly.", " no.")


def test_split_response_that_says_assistant():
    chosen = "\n\nHuman: who are you?\n\nAssistant: Assistant: that is my name. Human: is not yours."
    rejected = "\n\nHuman: who are you?\n\nAssistant: nobody"
    assert split_transcripts(chosen, rejected) == \
        ("\n\nHuman: who are you?\n\nAssistant:", " Assistant: that is my name. Human: is not yours.", " nobody")


@pytest.mark.parametrize('chosen,rejected,reason', [
    ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
     "\n\nHuman: a\n\nAssistant: X\n\nHuman: c\n\nAssistant: e", "differ before the last Assistant turn"),
    ("\n\nHuman: only a question", "\n\nHuman: only a question", "no '\\n\\nAssistant:' turn"),
    ("\n\nHuman: a\n\nAssistant: same", "\n\nHuman: a\n\nAssistant: same", "identical"),
    ("\n\nHuman: a\n\nAssistant:", "\n\nHuman: a\n\nAssistant: e", "chosen response is empty"),
])
def test_split_refusals_give_reasons(chosen, rejected, reason):
    assert reason in split_transcripts(chosen, rejected)


# ---------------------------------------------------------------- truncation by hand

def test_truncation_by_hand():
    prompt, chosen, rejected = list(range(1, 11)), [21, 22, EOT_TOKEN], [31, EOT_TOKEN]
    assert truncate(prompt, chosen, rejected, 20, 4) == (prompt, chosen, rejected, False)  # fits
    assert truncate(prompt, chosen, rejected, 8, 4) == ([7, 8, 9, 10], chosen, rejected, True)  # prompt's start goes
    assert truncate(prompt, chosen, rejected, 6, 4) == ([7, 8, 9, 10], [21, 22], [31, EOT_TOKEN], True)  # then responses' ends
    assert truncate([1, 2], list(range(10)), [5], 6, 4) == ([1, 2], [0, 1, 2, 3], [5], True)  # a short prompt stays
    assert truncate(prompt, chosen, rejected, 5, 5) is None  # no room for any response token


def test_worker_processes_tokenize_exactly_as_one_process():
    texts = [f"text {i} " * (i % 7) for i in range(9000)]  # 3 chunks, one of them empty-ish
    serial, parallel = data.encode_all(texts, 'x', workers=1), data.encode_all(texts, 'x', workers=2)
    assert np.array_equal(serial[0], parallel[0]) and np.array_equal(serial[1], parallel[1])
    tokens, offsets = parallel
    assert tokens[offsets[5000]:offsets[5001]].tolist() == encode(texts[5000])


# ---------------------------------------------------------------- the cache

def test_cache_is_reused_and_rebuilt_on_change(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / 'd.jsonl', [{'prompt': 'a', 'chosen': ' b', 'rejected': ' c'}])
    cache = str(tmp_path / 'cache')
    first = load_dataset('jsonl', 'train', data_path=path, cache_dir=cache)
    assert first.stats['cache'].startswith('wrote')

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds this data")
    monkeypatch.setattr(data, 'tokenize_pairs', no_tokenizing)
    again = load_dataset('jsonl', 'train', data_path=path, cache_dir=cache)
    assert again.stats['cache'] == 'loaded' + first.stats['cache'][len('wrote'):]
    for k in first.arrays:
        assert np.array_equal(first.arrays[k], again.arrays[k])
    monkeypatch.undo()
    assert load_dataset('jsonl', 'train', data_path=path, max_length=100, cache_dir=cache).stats['cache'].startswith('wrote')
    write_jsonl(path, [{'prompt': 'a', 'chosen': ' b', 'rejected': ' changed'}])
    changed = load_dataset('jsonl', 'train', data_path=path, cache_dir=cache)
    assert changed.stats['cache'].startswith('wrote') and changed.get('rejected', 0).tolist() == encode(' changed') + [EOT_TOKEN]
    assert len(os.listdir(cache)) == 3


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize('lines,message', [
    (['{"prompt": "a", "chosen": " b", "rejected": " c"}', '{"prompt": "a", "chosen": " b",'],
     r"d\.jsonl, line 2: not valid JSON"),
    (['{"prompt": "a", "chosen": " b"}'], r"d\.jsonl, line 1: missing field 'rejected'"),
    (['', '{"prompt": "a", "chosen": 3, "rejected": " c"}'], r"d\.jsonl, line 2: field 'chosen' must be a string, got int"),
    (['[1, 2]'], r"d\.jsonl, line 1: expected a JSON object, got list"),
    ([], r"d\.jsonl holds no usable pairs"),
    (['{"prompt": "a", "chosen": " b", "rejected": "  "}'], r"d\.jsonl, line 1: the rejected response is empty"),
    (['{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: X\\n\\nAssistant: c"}'],
     r"d\.jsonl, line 1: chosen and rejected differ before the last Assistant turn"),
    # KTO's unpaired rows
    (['{"prompt": "a", "completion": " b", "label": "yes"}'], r"d\.jsonl, line 1: field 'label' must be true or false, got 'yes'"),
    (['{"prompt": "a", "label": true}'], r"d\.jsonl, line 1: missing field 'completion'"),
    (['{"prompt": "a", "completion": " ", "label": false}'], r"d\.jsonl, line 1: the completion is empty"),
    (['{"prompt": "a", "completion": " b", "label": true}', '{"prompt": "a", "chosen": " b", "rejected": " c"}'],
     r"d\.jsonl, line 2: a pair in a file of unpaired rows \(.*d\.jsonl, line 1\); a file holds one kind"),
    (['{"prompt": "a", "chosen": " b", "rejected": " c"}', '{"prompt": "a", "completion": " b", "label": true}'],
     r"d\.jsonl, line 2: an unpaired row \(with a label\) in a file of pairs"),
    (['{"prompt": "' + 'word ' * 300 + '", "chosen": " b", "rejected": " c"}'],
     r"d\.jsonl, line 1: the prompt keeps 64 tokens after truncation to max_prompt_length=64, .*max_length=64"),
])
def test_bad_input_is_named_and_nothing_is_written(lines, message, tmp_path):
    path = write_jsonl(tmp_path / 'd.jsonl', lines)
    cache = tmp_path / 'cache'
    with pytest.raises(UserError, match=message):
        load_dataset('jsonl', 'train', data_path=path, max_length=64, max_prompt_length=64, cache_dir=str(cache),
                     unpaired_ok=True)
    assert not cache.exists() or not os.listdir(cache)


def test_bytes_that_are_not_utf8_are_named_with_their_line(tmp_path):
    path = tmp_path / 'd.jsonl'
    path.write_bytes(b'{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": "caf\xe9", "chosen": " b", "rejected": " c"}\n')
    with pytest.raises(UserError, match=r"d\.jsonl, line 2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_dataset('jsonl', 'train', data_path=str(path), cache_dir=str(tmp_path / 'cache'))


def test_gzip_is_read_whatever_the_name(tmp_path):
    rows = [{'prompt': 'a', 'chosen': ' b', 'rejected': ' c'}, {'prompt': 'd', 'chosen': ' e', 'rejected': ' f'}]
    with gzip.open(tmp_path / 'd.jsonl', 'wt') as f:  # compressed, but named .jsonl
        f.writelines(json.dumps(r) + '\n' for r in rows)
    plain = write_jsonl(tmp_path / 'plain.jsonl', rows)
    a = load_dataset('jsonl', 'train', data_path=str(tmp_path / 'd.jsonl'), cache_dir=str(tmp_path / 'cache'))
    b = load_dataset('jsonl', 'train', data_path=plain, cache_dir=str(tmp_path / 'cache'))
    for k in a.arrays:
        assert np.array_equal(a.arrays[k], b.arrays[k])


def test_a_directory_as_data_path_is_called_a_directory(tmp_path):
    with pytest.raises(UserError, match=f"data_path='{tmp_path}' is a directory: give the JSONL file itself"):
        load_dataset('jsonl', 'train', data_path=str(tmp_path), cache_dir=str(tmp_path / 'cache'))
    with pytest.raises(UserError, match=r"^data_path='/dev/null' is not a regular file \(a device or a pipe\)"):
        load_dataset('jsonl', 'train', data_path='/dev/null', cache_dir=str(tmp_path / 'cache'))


@pytest.mark.parametrize('damage', ['cut', 'garbage'])
def test_a_corrupt_cache_file_is_named_and_rebuilt(damage, tmp_path, capsys):
    path = write_jsonl(tmp_path / 'd.jsonl', [{'prompt': 'a', 'chosen': ' b', 'rejected': ' c'}])
    cache = str(tmp_path / 'cache')
    first = load_dataset('jsonl', 'train', data_path=path, cache_dir=cache)
    with open(first.path, 'rb') as f:
        good = f.read()
    with open(first.path, 'wb') as f:
        f.write(good[:len(good) // 2] if damage == 'cut' else b'\x00' * 100)
    again = load_dataset('jsonl', 'train', data_path=path, cache_dir=cache)
    assert f"warning: the token cache {first.path} is unreadable" in capsys.readouterr().err
    assert again.stats['cache'] == f"wrote {first.path}"
    for k in first.arrays:
        assert np.array_equal(first.arrays[k], again.arrays[k])
    assert load_dataset('jsonl', 'train', data_path=path, cache_dir=cache).stats['cache'].startswith('loaded')


def test_cli_prints_one_line_and_writes_nothing(tmp_path):
    path = write_jsonl(tmp_path / 'd.jsonl', ['{"prompt": "a", "chosen": " b"}'])
    run = subprocess.run([sys.executable, 'data.py', '--dataset=jsonl', f'--data_path={path}',
                          f'--cache_dir={tmp_path / "cache"}'], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0
    assert run.stderr.strip() == f"error: {path}, line 1: missing field 'rejected'"
    assert not (tmp_path / 'cache').exists()


# ---------------------------------------------------------------- HH through the hub code path

def test_hh_reads_the_dataset_repo_layout(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    repo = tmp_path / 'hub' / 'datasets--Anthropic--hh-rlhf'
    snapshot = repo / 'snapshots' / ('a' * 40)
    (snapshot / 'helpful-base').mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('a' * 40)
    rows = [{'chosen': "\n\nHuman: hi\n\nAssistant: hello", 'rejected': "\n\nHuman: hi\n\nAssistant: go away"},
            {'chosen': "\n\nHuman: q\n\nAssistant: a\n\nHuman: q2\n\nAssistant: good",
             'rejected': "\n\nHuman: q\n\nAssistant: a\n\nHuman: q2\n\nAssistant: bad"},
            {'chosen': "\n\nHuman: x\n\nAssistant: same", 'rejected': "\n\nHuman: x\n\nAssistant: same"}]
    with gzip.open(snapshot / 'helpful-base' / 'train.jsonl.gz', 'wt') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in rows))
    pairs = load_dataset('hh', 'train', hh_subsets='helpful-base', cache_dir=str(tmp_path / 'cache'),
                         hub_cache_dir=str(tmp_path / 'hub'))
    assert len(pairs) == 2
    assert pairs.stats['dropped'] == {'chosen and rejected are identical': 1}
    assert pairs.get('prompt', 1).tolist() == encode("\n\nHuman: q\n\nAssistant: a\n\nHuman: q2\n\nAssistant:")
    with pytest.raises(UserError, match="unknown hh_subsets \\['helpful'\\]"):
        load_dataset('hh', 'train', hh_subsets='helpful', cache_dir=str(tmp_path / 'cache'))
    with pytest.raises(UserError, match="could not get harmless-base/train.jsonl.gz of the dataset Anthropic/hh-rlhf"):
        load_dataset('hh', 'train', hh_subsets='harmless-base', cache_dir=str(tmp_path / 'cache'),
                     hub_cache_dir=str(tmp_path / 'hub'))


def test_the_token_cache_follows_the_files_content_not_its_name_size_and_mtime(tmp_path):
    """A file replaced by another of the same size with its mtime kept (cp -p, rsync -a) is read
    anew: the cache is keyed by the content's sha256."""
    path, cache = tmp_path / 'pairs.jsonl', str(tmp_path / 'cache')
    write_jsonl(path, [{'prompt': ' Hello', 'chosen': ' AAAA 00.', 'rejected': ' no'}])
    first = load_dataset('jsonl', 'train', data_path=str(path), cache_dir=cache)
    stat = os.stat(path)
    write_jsonl(path, [{'prompt': ' Hello', 'chosen': ' BBBB 00.', 'rejected': ' no'}])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same size and mtime as before
    assert os.stat(path).st_size == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    second = load_dataset('jsonl', 'train', data_path=str(path), cache_dir=cache)
    assert first.get('chosen', 0).tolist() == encode(' AAAA 00.') + [EOT_TOKEN]
    assert second.get('chosen', 0).tolist() == encode(' BBBB 00.') + [EOT_TOKEN]
    assert second.stats['cache'].startswith('wrote')


def test_the_token_cache_goes_where_nanodpo_data_cache_says_and_a_failed_write_says_so(tmp_path):
    env = {**os.environ, 'NANODPO_DATA_CACHE': str(tmp_path / 'elsewhere')}
    result = subprocess.run([sys.executable, 'data.py', '--dataset=synthetic', '--max_length=64',
                             '--max_prompt_length=32'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / 'elsewhere')) == sorted(
        re.findall(r"(synthetic-(?:train|test)-\w+\.npz)", result.stdout))
    (tmp_path / 'a_file').write_text('')  # a cache directory that cannot be made (as on a read-only disk)
    with pytest.raises(UserError, match=r"^could not write .*a_file/synthetic-test-\w+\.npz: FileExistsError: .*; "
                                        r"nothing was cached; NANODPO_DATA_CACHE=DIR puts the caches in DIR instead$"):
        load_dataset('synthetic', 'test', max_length=64, max_prompt_length=32, cache_dir=str(tmp_path / 'a_file'))
