"""Online DPO (dpo.py with online=True; online.py): pairs the right way round from the judge's
scores with ties dropped, judges given as module:function with clear errors, the implicit-reward
judge against beta * log-ratio by hand."""


import numpy as np
import pytest
import torch
from dataclasses import asdict

from common import UserError
import online
import checkpoint
import common
import parallel
from data import EOT_TOKEN, decode, tokenize_pairs
from model import GPT, GPTConfig
from data import synthetic_pairs


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=16))


def test_rank_pairs_by_hand():
    a_is_chosen, kept = online.rank_pairs([0.5, 0.1, 0.3, -1.0], [0.2, 0.4, 0.3, -1.0])
    assert a_is_chosen.tolist() == [True, False, False, False] and kept.tolist() == [True, True, False, False]


def test_online_pairs_are_the_right_way_round_and_ties_give_none(tiny):
    """A judge that scores a response by its first token id mod 3 (a tie one time in three): every
    chosen response scores higher than its rejected one, ties are dropped, exactly n_pairs come back."""
    data = tokenize_pairs(synthetic_pairs(40, seed=3), 64, 32)
    run = parallel.start('cpu', 'float32', 0)
    seen = []
    score = lambda response: float(response[0] % 3)

    def by_first_token(prompt_texts, response_texts, prompt_ids, response_ids):
        scores = np.array([score(r) for r in response_ids])
        seen.append(scores)
        return scores
    batches = iter([np.arange(i, i + 8) for i in range(0, 40, 8)])
    pairs, totals = online.sample_pairs(tiny, data, lambda: next(batches), 10, by_first_token, run, max_length=64,
                                        max_new_tokens=6, temperature=1.0)
    assert len(pairs) == 10
    for i in range(10):
        assert score(pairs.get('chosen', i)) > score(pairs.get('rejected', i))
    scores = np.concatenate(seen)
    ties = (scores[0::2] == scores[1::2])
    assert totals[0].tolist() == pytest.approx([scores.sum(), len(scores)])  # online/score over every sample
    assert totals[1].tolist() == [ties.sum(), len(ties)]                      # online/ties over every prompt
    assert ties.any() and int((~ties).sum()) >= 10 and tiny.training  # ties met; the policy back in training mode


def test_a_judge_that_always_ties_stops_the_run(tiny):
    data = tokenize_pairs(synthetic_pairs(8, seed=3), 64, 32)
    run = parallel.start('cpu', 'float32', 0)
    constant = lambda prompt_texts, response_texts, *ids: np.zeros(len(response_texts))
    with pytest.raises(UserError, match=r"^in 3 batches of prompts the judge told the two samples apart for only 0 prompts, fewer than the 2 pairs"):
        online.sample_pairs(tiny, data, lambda: np.arange(4), 2, constant, run, max_length=64, max_tries=3,
                            max_new_tokens=2, temperature=1.0)


def test_errors_from_one_ranks_samples_name_the_rank(tiny, capsys, monkeypatch):
    """Under torchrun only rank 0 prints an error, unless the error names its rank: online's errors
    come from each rank's own samples, so they name it, and rank 1 prints its own."""
    data = tokenize_pairs(synthetic_pairs(8, seed=3), 64, 32)
    run = parallel.start('cpu', 'float32', 0)
    run.ddp, run.rank = True, 1  # as rank 1 of a torchrun run sees itself (no process group needed here)
    monkeypatch.setenv('RANK', '1')
    constant = lambda prompt_texts, response_texts, *ids: np.zeros(len(response_texts))

    def not_finite(*args):
        raise online.UserError("judge='mine:score' returned a score that is NaN or infinite")
    for judge, error, message in ((constant, UserError, "rank 1: in 2 batches of prompts the judge told"),
                                  (not_finite, online.UserError, "rank 1: judge='mine:score' returned a score that is NaN")):
        with pytest.raises(error) as caught:
            online.sample_pairs(tiny, data, lambda: np.arange(4), 2, judge, run, max_length=64, max_tries=2,
                                max_new_tokens=2, temperature=1.0)
        assert str(caught.value).startswith(message)
        with pytest.raises(SystemExit):
            common.exit_with_error(caught.value)
        assert capsys.readouterr().err.startswith(f"error: {message}")  # printed by rank 1


def test_a_user_judge_from_a_file_and_its_errors(tmp_path):
    (tmp_path / 'judges.py').write_text(
        "def by_length(prompts, responses):\n    return [float(len(r)) for r in responses]\n"
        "def too_few(prompts, responses):\n    return [1.0]\n"
        "def nan(prompts, responses):\n    return [float('nan')] * len(responses)\n"
        "def words(prompts, responses):\n    return ['high'] * len(responses)\n"
        "def column(prompts, responses):\n    return [[1.0] for r in responses]\n"
        "def fails(prompts, responses):\n    return {}['score']\n"
        "not_a_function = 3\n")
    (tmp_path / 'broken.py').write_text("import no_such_module_here\n")
    path = str(tmp_path / 'judges.py')
    judge = online.load_judge(f'{path}:by_length')
    assert judge(['p', 'p'], ['ab', 'abcd'], [[1], [1]], [[2], [3]]).tolist() == [2.0, 4.0]
    call = lambda spec: online.load_judge(spec)(['p', 'p'], ['a', 'b'], [[1], [1]], [[2], [3]])
    for spec, message in [
        (f'{path}:too_few', r"returned 1 scores for 2 responses: it must return one score a response"),
        (f'{path}:column', r"returned scores of shape \(2, 1\) for 2 responses: it must return one score a response, "
                           r"a list or 1-D array of 2 numbers$"),
        (f'{path}:fails', rf"^judge='{path}:fails' raised KeyError: 'score' \(at {path}, line 12\)$"),
        (f'{path}:nan', r"returned a score that is NaN or infinite"),
        (f'{path}:words', r"did not return numbers"),
        (f'{path}:not_a_function', r"has no function 'not_a_function'"),
        (f'{path}:missing', r"has no function 'missing'"),
        (f'{tmp_path / "nope.py"}:f', r"no file .*nope\.py"),
        (f'{tmp_path / "broken.py"}:f', r"cannot import .*broken\.py \(ModuleNotFoundError: No module named 'no_such_module_here'\)"),
        ('no_such_package_xyz:f', r"cannot import no_such_package_xyz \(ModuleNotFoundError"),
        ('best', r"judge='best': use 'true_reward', 'module:function', 'implicit:DIR' or 'implicit_per_token:DIR'"),
    ]:
        with pytest.raises(online.UserError, match=message):
            call(spec)


def test_the_true_reward_judge_scores_texts():
    pair = synthetic_pairs(1, seed=4)[0]
    from data import true_reward
    scores = online.load_judge('true_reward')([pair['prompt']] * 2, [pair['chosen'], pair['rejected']], None, [[0], [0]])
    assert scores.tolist() == [true_reward(pair['prompt'], pair['chosen']), true_reward(pair['prompt'], pair['rejected'])]


def test_the_implicit_reward_judge_is_beta_times_the_log_ratio(tmp_path):
    models = {}
    for name, seed in (('policy', 1), ('ref', 2)):
        torch.manual_seed(seed)
        models[name] = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    checkpoint.write({'model_args': asdict(models['ref'].config), 'model': models['ref'].state_dict()},
                            str(tmp_path / 'ref' / 'ckpt.pt'))
    checkpoint.write({'script': 'dpo', 'model_args': asdict(models['policy'].config),
                             'model': models['policy'].state_dict(),
                             'config': {'ref_from': str(tmp_path / 'ref'), 'beta': 0.3, 'loss_type': 'sigmoid'}},
                            str(tmp_path / 'dpo' / 'ckpt.pt'))
    judge = online.load_judge(f'implicit:{tmp_path / "dpo"}')
    prompts, responses = [[10, 20, 30], [40]], [[5, 6, EOT_TOKEN], [7, 8, 9, 11]]
    by_hand = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            idx, targets = torch.tensor([p + r[:-1]]), torch.tensor([[-1] * (len(p) - 1) + r])
            log_ratio = models['policy'](idx, targets).sum() - models['ref'](idx, targets).sum()  # summed over the response
            by_hand.append(0.3 * log_ratio.item())
    texts = [decode(p) for p in prompts], [decode(r) for r in responses]
    assert judge(*texts, prompts, responses).tolist() == pytest.approx(by_hand, abs=1e-5)
    per_token = online.load_judge(f'implicit_per_token:{tmp_path / "dpo"}')(*texts, prompts, responses)
    assert per_token.tolist() == pytest.approx([by_hand[0] / 3, by_hand[1] / 4], abs=1e-5)  # 3 and 4 response tokens
    with pytest.raises(online.UserError, match=r"is not a DPO run with a reference"):
        online.load_judge(f'implicit:{tmp_path / "ref"}')
    with pytest.raises(online.UserError, match=r"no DPO run there"):
        online.load_judge(f'implicit:{tmp_path / "nothing"}')
    with pytest.raises(online.UserError, match=r"judge='implicit_per_token:.*nothing': no DPO run there"):
        online.load_judge(f'implicit_per_token:{tmp_path / "nothing"}')
