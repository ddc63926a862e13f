"""
The embedded preference task: short movie reviews with a known true reward, in the spirit of the
DPO paper's IMDb experiment (there a sentiment classifier scores samples; here a function does).

    Human: Write a positive review of The Silent Harbor that covers the acting and the music.

    Assistant: The acting was superb. I found the music dull.

A review is a few sentences, each about one aspect with one adjective. true_reward() scores any
text, a model's own samples included, in [-1, 1]:

    0.5 * coverage        share of the requested aspects that some sentence covers
  + 0.5 * sentiment       mean over sentences of +1 (positive adjective), 0 (neutral), -1 (negative)
  - 0.25 * off_topic      share of sentences about an aspect that was not requested, or repeated
    and -1 for anything that is not such sentences (an empty or malformed response)

The demonstrations come from a careless writer who covers the requested aspects only part of the
time and picks adjectives of any sentiment. Their mean true reward is about 0.27, that of the chosen
responses (what supervised fine-tuning imitates) about 0.49, and only 9% of those reach the best
score, 1.0: SFT learns the format, and the preference is left for DPO to learn. Each pair is two such
responses to one prompt, labelled by the true reward, as the paper labels its IMDb pairs.
"""

import random
import re

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
