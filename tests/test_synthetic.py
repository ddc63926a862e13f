"""The embedded task: deterministic, labelled by its true reward, and the reward by hand."""

from data import synthetic_pairs, true_reward

PROMPT = "\n\nHuman: Write a positive review of The Last Garden that covers the acting and the music.\n\nAssistant:"


def test_same_seed_same_data():
    assert synthetic_pairs(200, 3) == synthetic_pairs(200, 3)
    assert synthetic_pairs(200, 3) != synthetic_pairs(200, 4)


def test_every_chosen_beats_its_rejected():
    for p in synthetic_pairs(3000, 0):
        assert true_reward(p['prompt'], p['chosen']) > true_reward(p['prompt'], p['rejected'])


def test_true_reward_by_hand():
    assert true_reward(PROMPT, " The acting was superb. I found the music moving.") == 1.0
    # half the aspects covered, sentiment (1 + 0) / 2, no sentence off the request
    assert true_reward(PROMPT, " The acting was superb. The acting was long.") == 0.5 * 0.5 + 0.5 * 0.5 - 0.25 * 0.5
    # one sentence off the request, one negative
    assert true_reward(PROMPT, " The plot was dull. The music was clever.") == 0.5 * 0.5 + 0.5 * 0 - 0.25 * 0.5
    assert true_reward(PROMPT, " The acting was superb. and then") == -1.0  # malformed
    assert true_reward(PROMPT, " The acting was purple.") == -1.0  # not an adjective of the task
    assert true_reward(PROMPT, "") == -1.0
