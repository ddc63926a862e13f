"""
Online DPO's pieces (Guo et al., 2024, "Direct Language Model Alignment from Online AI Feedback"):
responses sampled from the current policy, a judge that scores them, and the pairs built from the
scores. dpo.py with online=True trains on these pairs instead of a dataset's.

A judge takes prompts and responses (texts, and their token ids) and returns one score a response;
the higher one of a prompt's two samples is chosen, and a tie gives no pair. Judges:
    'true_reward'       the embedded task's true reward (synthetic.true_reward)
    'module:function'   a Python function of yours: function(prompts, responses) -> scores, texts in,
                        one float a response out (the module found on the import path, or a .py file)
    'implicit:DIR'      a trained DPO run's implicit reward, beta * log(pi(y|x) / pi_ref(y|x)), with the
                        run's own reference and beta: "your language model is secretly a reward model",
                        online feedback with no separate reward model
    'implicit_per_token:DIR'  the same divided by the response's tokens: the summed log-ratio grows with
                        every repeat of a word the DPO run upweighted, and a policy trained online
                        against it learns to repeat them (docs/FAMILY.md)
Sampling (sample_responses) is also what tools/evaluate.py scores policies with.
"""

import importlib
import importlib.util
import os
import traceback
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

from common import UserError, first_line
from data import PairData, decode, response_text, true_reward
from losses import metric_totals, sequence_logps
from model import load_model, read_checkpoint


@torch.no_grad()
def sample_responses(model, prompt_ids, n, generator=None, ctx=nullcontext(), rows_per_batch=128, desc='sampling',
                     max_length=None, **sampling):
    """n responses (token lists, ending at EOT when one was drawn) for each prompt: a list of
    len(prompt_ids) * n, the n samples of a prompt side by side, generated rows_per_batch at a time
    (with a progress bar on stderr when there is more than one batch). Prompt + response stays within
    max_length (default: the model's block_size), so that every sample can be scored."""
    rows = [p for p in prompt_ids for _ in range(n)]
    limit = max_length or model.config.block_size
    responses = []
    for i in tqdm(range(0, len(rows), rows_per_batch), desc=desc, unit=' batches', disable=len(rows) <= rows_per_batch):
        batch = rows[i:i + rows_per_batch]
        room = limit - max(map(len, batch))
        with ctx:
            responses += model.generate(batch, generator=generator, **{**sampling, 'max_new_tokens': min(
                sampling['max_new_tokens'], room)})
    return responses


# -------------------------------------------------------------------- judges

def true_reward_judge(prompt_texts, response_texts, prompt_ids, response_ids):
    return np.array([true_reward(p, r) for p, r in zip(prompt_texts, response_texts)])


def user_judge(spec):
    """The function of 'module:function' (a module on the import path, or a path to a .py file),
    called with texts only: function(prompts, responses) -> scores."""
    module_name, _, function_name = spec.rpartition(':')
    try:
        if module_name.endswith('.py'):
            if not os.path.isfile(module_name):
                raise UserError(f"judge={spec!r}: no file {module_name}")
            loader_spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as e:  # not found, or the module itself fails on import
        raise UserError(f"judge={spec!r}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"judge={spec!r}: {module_name} has no function {function_name!r}")
    return lambda prompt_texts, response_texts, prompt_ids, response_ids: function(prompt_texts, response_texts)


def implicit_reward_judge(run_dir, device, autocast=nullcontext(), per_token=False):
    """A DPO run's implicit reward as a judge: beta * (log pi(y|x) - log pi_ref(y|x)) with the
    run's policy (run_dir/ckpt.pt), and the reference and beta its checkpoint records; per_token:
    divided by the response's tokens (<|endoftext|> included)."""
    spec = f"{'implicit_per_token' if per_token else 'implicit'}:{run_dir}"
    path = os.path.join(run_dir, 'ckpt.pt')
    if not os.path.isfile(path):
        raise UserError(f"judge={spec!r}: no DPO run there (no {path})")
    run = read_checkpoint(path)
    config = run.get('config', {})
    if run.get('script') != 'dpo' or config.get('loss_type') == 'simpo' or not config.get('ref_from'):
        raise UserError(f"judge={spec!r}: {path} is not a DPO run with a reference (written by "
                         f"{run.get('script', 'an older version')}.py, loss_type {config.get('loss_type')}); "
                         "the implicit reward is the log-ratio of a DPO policy to its reference")
    policy = load_model(run_dir, device=device, checkpoint=run).eval()
    ref = load_model(config['ref_from'], device=device).eval()
    beta = config['beta']

    def judge(prompt_texts, response_texts, prompt_ids, response_ids):
        rewards = beta * (sequence_logps(policy, prompt_ids, response_ids, autocast) -
                          sequence_logps(ref, prompt_ids, response_ids, autocast))  # (N,)
        return rewards / np.array([len(r) for r in response_ids]) if per_token else rewards
    return judge


def load_judge(spec, device='cpu', autocast=nullcontext()):
    """A judge from its name (module docstring): a function (prompt_texts, response_texts,
    prompt_ids, response_ids) -> (N,) float scores, checked for shape and finiteness when called."""
    if spec == 'true_reward':
        judge = true_reward_judge
    elif spec.startswith(('implicit:', 'implicit_per_token:')):
        kind, _, run_dir = spec.partition(':')
        judge = implicit_reward_judge(run_dir, device, autocast, per_token=kind == 'implicit_per_token')
    elif ':' in spec:
        judge = user_judge(spec)
    else:
        raise UserError(f"judge={spec!r}: use 'true_reward', 'module:function', 'implicit:DIR' or 'implicit_per_token:DIR'")

    def checked(prompt_texts, response_texts, prompt_ids, response_ids):
        try:
            scores = judge(prompt_texts, response_texts, prompt_ids, response_ids)
        except UserError:
            raise
        except Exception as e:  # the user's code failed: where, in one line
            frame = traceback.extract_tb(e.__traceback__)[-1]
            raise UserError(f"judge={spec!r} raised {type(e).__name__}: {first_line(e)} (at "
                            f"{frame.filename}, line {frame.lineno})") from None
        try:
            scores = np.asarray(scores, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise UserError(f"judge={spec!r} did not return numbers ({type(e).__name__}: {e})") from None
        n = len(response_texts)
        if scores.shape != (n,):
            got = (f"scores of shape {scores.shape}" if scores.ndim > 1 else
                   f"{scores.shape[0]} scores" if scores.ndim else "a single number")
            raise UserError(f"judge={spec!r} returned {got} for {n} responses: it must return one "
                            f"score a response, a list or 1-D array of {n} numbers")
        if not np.all(np.isfinite(scores)):
            raise UserError(f"judge={spec!r} returned a score that is NaN or infinite")
        return scores
    return checked


# -------------------------------------------------------------------- pairs

def step_pairs(policy, data, next_indices, n_pairs, judge, run, max_length, **sampling):
    """sample_pairs, below, for a micro-step of dpo.py: (pairs, totals, None); or, where it failed
    on any rank (the judge raised, or tied too often), (None, None, error) on every rank at once,
    so that the run saves where the step began before error ends it. Under DDP a collective."""
    try:
        pairs, totals = sample_pairs(policy, data, next_indices, n_pairs, judge, run, max_length,
                                     **sampling)
        error = None
    except UserError as e:
        pairs, totals, error = None, None, e
    return pairs, totals, run.error_on_any_rank(error, "online DPO's sampling")


def rank_pairs(scores_a, scores_b):
    """For two samples of each prompt, (a_is_chosen, kept): the higher score is chosen, and a tie
    gives no pair. Both (N,) bool."""
    scores_a, scores_b = np.asarray(scores_a), np.asarray(scores_b)
    return scores_a > scores_b, scores_a != scores_b


def sample_pairs(policy, data, next_indices, n_pairs, judge, run, max_length, max_tries=20, **sampling):
    """n_pairs pairs sampled from the current policy and ranked by the judge, as PairData: two
    responses to each prompt of data's next batches (next_indices() gives one batch of indices), until
    n_pairs are found (ties give none). Also the totals of losses.ONLINE_METRICS, over every
    sample drawn, kept or not. Its errors come from this rank's own samples: under torchrun they
    name the rank, so that it prints them (common.exit_with_error), not only rank 0.
    It takes as many of data's batches as ties make it need: one or more."""
    this_rank = f"rank {run.rank}: " if run.ddp else ''
    was_training = policy.training
    policy.eval()  # no dropout while sampling
    found = {'prompt': [], 'chosen': [], 'rejected': []}
    scores, ties = [], []
    for _ in range(max_tries):
        indices = next_indices()
        prompt_ids = [data.get('prompt', i).tolist() for i in indices]
        responses = sample_responses(policy, prompt_ids, 2, None, run.autocast, max_length=max_length, **sampling)
        rows = [p for p in prompt_ids for _ in range(2)]
        prompt_texts = [decode(p) for p in rows]
        try:
            response_scores = judge(prompt_texts, [response_text(r) for r in responses], rows, responses)
        except UserError as e:
            raise UserError(this_rank + str(e)) from None
        a_is_chosen, kept = rank_pairs(response_scores[0::2], response_scores[1::2])  # each prompt's two samples
        for n, prompt in enumerate(prompt_ids):
            if kept[n] and len(found['prompt']) < n_pairs:
                a, b = responses[2 * n], responses[2 * n + 1]
                found['prompt'].append(prompt)
                found['chosen'].append(a if a_is_chosen[n] else b)
                found['rejected'].append(b if a_is_chosen[n] else a)
        scores.append(response_scores)
        ties.append(~kept)
        if len(found['prompt']) == n_pairs:
            break
    else:
        raise UserError(f"{this_rank}in {max_tries} batches of prompts the judge told the two samples apart for only "
                                    f"{len(found['prompt'])} prompts, fewer than the {n_pairs} pairs a micro-step "
                                    "needs; a judge that cannot tell samples apart gives online DPO nothing to learn")
    policy.train(was_training)
    return PairData.from_sequences(found, {}), metric_totals((torch.from_numpy(np.concatenate(scores)), None),
                                               (torch.from_numpy(np.concatenate(ties)), None))
