"""Every config file in config/ parses against its script, and every setting a user can get wrong
stops before any work with one line naming the key, the value and the range."""

import glob
import os
import re

import pytest

import bench
import demo
import dpo
import evaluate
import sample
import sft
from configurator import apply_overrides, check_ranges, config_keys, configure
from conftest import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'config', '*.py')))


def test_there_are_configs():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_parses(path):
    script = sft if os.path.basename(path).startswith('sft') else dpo
    namespace = dict(vars(script))
    applied = apply_overrides(namespace, [path])
    assert applied and 'init_from' in applied
    check_ranges(namespace, script.RANGES)


SCRIPTS = {'dpo': dpo, 'sft': sft, 'sample': sample, 'evaluate': evaluate, 'demo': demo, 'bench': bench}


@pytest.mark.parametrize('name', SCRIPTS)
def test_every_number_setting_has_a_range(name):
    """A new setting without a range fails here: add it to the script's RANGES."""
    script = SCRIPTS[name]
    numbers = {k for k, v in vars(script).items() if not k.startswith('_') and k.islower()
               and (v is None or type(v) in (int, float))}
    assert numbers - set(script.RANGES) == set()
    check_ranges(vars(script), script.RANGES)  # the defaults are in range


BAD = [  # script, arguments, the one line the user sees
    ('dpo', ['--gradient_accumulation_steps=0'], "gradient_accumulation_steps=0 is out of range: it must be >= 1"),
    ('dpo', ['--beta=-0.1'], "beta=-0.1 is out of range: it must be > 0"),
    ('dpo', ['--loss_type=ipo', '--beta=0'], "beta=0.0 is out of range: it must be > 0"),
    ('dpo', ['--label_smoothing=0.5'], "label_smoothing=0.5 is out of range: it must be in [0, 0.5)"),
    ('dpo', ['--label_smoothing=-0.1'], "label_smoothing=-0.1 is out of range: it must be in [0, 0.5)"),
    ('dpo', ['--batch_size=-1'], "batch_size=-1 is out of range: it must be >= 1"),
    ('dpo', ['--batch_size=0'], "batch_size=0 is out of range: it must be >= 1"),
    ('dpo', ['--eval_interval=0'], "eval_interval=0 is out of range: it must be >= 1"),
    ('dpo', ['--log_interval=0'], "log_interval=0 is out of range: it must be >= 1"),
    ('dpo', ['--learning_rate=-1e-6'], "learning_rate=-1e-06 is out of range: it must be > 0"),
    ('dpo', ['--dropout=1.0'], "dropout=1.0 is out of range: it must be in [0, 1)"),
    ('dpo', ['--dropout=-0.1'], "dropout=-0.1 is out of range: it must be in [0, 1)"),
    ('dpo', ['--eval_iters=0'], "eval_iters=0 is out of range: it must be -1 (all) or >= 1"),
    ('dpo', ['--max_iters=-5'], "max_iters=-5 is out of range: it must be >= 0"),
    ('dpo', ['--seed=-1'], "seed=-1 is out of range: it must be >= 0"),
    ('dpo', ['--rpo_alpha=-1'], "rpo_alpha=-1.0 is out of range: it must be >= 0"),
    ('dpo', ['--beta2=1.0'], "beta2=1.0 is out of range: it must be in [0, 1)"),
    ('dpo', ['--grad_clip=-1'], "grad_clip=-1.0 is out of range: it must be >= 0"),
    ('dpo', ['--dtype=fp8'], "dtype='fp8' is out of range: it must be one of auto, float32, bfloat16, float16"),
    ('dpo', ['--lora_rank=-1'], "lora_rank=-1 is out of range: it must be >= 0"),
    ('dpo', ['--lora_alpha=0'], "lora_alpha=0.0 is out of range: it must be > 0"),
    ('dpo', ['--dataset=hhrlhf'], "dataset='hhrlhf' is out of range: it must be one of hh, jsonl, synthetic"),
    ('dpo', ['LIST'], "config file {list}: hh_subsets must be a str (default 'all'), got ['helpful-base'] "
                      "(give a list as one comma-separated string: 'helpful-base')"),
    ('sft', ['--n_head=0'], "n_head=0 is out of range: it must be >= 1"),
    ('sft', ['--batch_size=0'], "batch_size=0 is out of range: it must be >= 1"),
    ('sft', ['--warmup_iters=-1'], "warmup_iters=-1 is out of range: it must be >= 0"),
    ('sample', ['--num_samples=0'], "num_samples=0 is out of range: it must be >= 1"),
    ('sample', ['--temperature=-1'], "temperature=-1.0 is out of range: it must be >= 0"),
    ('sample', ['--top_k=-1'], "top_k=-1 is out of range: it must be None or >= 1"),
    ('sample', ['--top_k=0'], "top_k=0 is out of range: it must be None or >= 1"),
    ('sample', ['--top_p=0'], "top_p=0 is out of range: it must be None or in (0, 1]"),
    ('sample', ['--top_p=1.5'], "top_p=1.5 is out of range: it must be None or in (0, 1]"),
    ('sample', ['--max_new_tokens=0'], "max_new_tokens=0 is out of range: it must be >= 1"),
    ('evaluate', ['--temperature=-0.5'], "temperature=-0.5 is out of range: it must be >= 0"),
    ('evaluate', ['--samples_per_prompt=0'], "samples_per_prompt=0 is out of range: it must be >= 1"),
    ('evaluate', ['--batch_size=0'], "batch_size=0 is out of range: it must be >= 1"),
    ('demo', ['--betas='], "betas='' is out of range: it must be one or more comma-separated betas, e.g. '0.1' "
                           "(the demo needs a DPO run)"),
]


@pytest.mark.parametrize('name,args,message', BAD, ids=[f"{b[0]} {' '.join(b[1])}" for b in BAD])
def test_bad_settings_stop_with_one_line(name, args, message, tmp_path, capsys):
    config = tmp_path / 'subsets.py'
    config.write_text("hh_subsets = ['helpful-base']\n")  # a list, where the key takes a string
    args = [str(config) if a == 'LIST' else a for a in args]
    namespace = dict(vars(SCRIPTS[name]))
    with pytest.raises(SystemExit) as stop:
        configure(namespace, SCRIPTS[name].RANGES, args)
    assert str(stop.value) == 'config error: ' + message.format(list=config)


@pytest.mark.parametrize('name', SCRIPTS)
def test_help_lists_every_setting_with_its_default_and_comment(name, capsys):
    script = SCRIPTS[name]
    with pytest.raises(SystemExit) as stop:
        configure(dict(vars(script)), script.RANGES, ['--lerning_rate=1', '--help'])  # --help wins over a typo
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python {name}.py [config/file.py ...] [--key=value ...]")
    for key, default in config_keys(vars(script)).items():
        assert f"--{key}={default!r}" in out
    if name == 'dpo':  # the comment beside the setting, under the config block's section heading
        assert re.search(r"\n  the loss\n    --beta=0\.1 +the KL penalty's strength", out)


CONFLICTS = [
    ('dpo', ['--loss_type=kto', '--batch_size=1'], "loss_type='kto' needs batch_size >= 2"),
    ('dpo', ['--loss_type=kto', '--precompute_ref_logps=True'], "precompute_ref_logps=True does not go with "
                                                                "loss_type='kto'"),
    ('dpo', ['--online=True', '--loss_type=kto'], "online=True samples new pairs every step"),
    ('dpo', ['--online=True', '--fsdp=True'], "fsdp=True does not go with online=True"),
    ('dpo', ['--fsdp=True', '--dtype=float16'], "fsdp=True does not go with dtype=float16"),
    ('dpo', ['--lora_rank=4', '--ref_from=gpt2'], "lora_rank=4 does not go with ref_from='gpt2': under LoRA the "
                                                  "reference is the policy's own base"),
    ('sft', ['--lora_rank=4', '--init_from=scratch'], "lora_rank=4 does not go with init_from='scratch'"),
    ('sft', ['--init_from=scratch', '--max_length=64', '--n_embd=30'], "n_embd=30 is not a multiple of n_head=4"),
    ('sft', ['--init_from=scratch', '--max_length=100', '--block_size=64'],
     "max_length=100 is longer than the model's block_size 64"),
]


@pytest.mark.parametrize('name,args,message', CONFLICTS, ids=[' '.join(c[1]) for c in CONFLICTS])
def test_settings_that_do_not_go_together_stop_before_any_work(name, args, message):
    """The checks of combinations live beside RANGES (CHECKS) and run in configure(), each one line."""
    with pytest.raises(SystemExit) as stop:
        configure(dict(vars(SCRIPTS[name])), SCRIPTS[name].RANGES, args, checks=SCRIPTS[name].CHECKS)
    assert str(stop.value).startswith('config error: ' + message)
    assert '\n' not in str(stop.value)
    configure(dict(vars(SCRIPTS[name])), SCRIPTS[name].RANGES, args[:-1], checks=SCRIPTS[name].CHECKS)  # without the last: fine


@pytest.mark.parametrize('name', SCRIPTS)
def test_no_setting_shadows_a_name_the_script_imports(name):
    """A setting named like an import (`import online`, then `online = False`) would replace the
    module with the setting's value, and the first call through it would fail deep in the run."""
    import ast
    tree = ast.parse(open(SCRIPTS[name].__file__).read())
    imported = {(a.asname or a.name).split('.')[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
    assert imported & set(config_keys(vars(SCRIPTS[name]))) == set()
