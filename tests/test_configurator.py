"""configurator.py: overrides as users type them, and one clear sentence for each mistake."""

import pytest

from common import UserError
from configurator import apply_overrides


def script_globals():
    import math  # a module among the globals is not a config key
    return dict(learning_rate=6e-4, max_iters=100, init_from='scratch', compile=False, top_k=None,
                math=math, _private=1)


def test_overrides_parse_as_typed(tmp_path):
    cfg = tmp_path / 'exp.py'
    cfg.write_text("# an experiment\nmax_iters = 2 * 50\nlearning_rate = 1e-5\nimport os\n")
    g = script_globals()
    applied = apply_overrides(g, [str(cfg), '--compile=True', '--learning_rate=3', '--init_from=gpt2',
                                  '--top_k=50', '--max_iters=7'])
    assert applied == dict(max_iters=7, learning_rate=3.0, compile=True, init_from='gpt2', top_k=50)
    assert g['max_iters'] == 7 and isinstance(g['learning_rate'], float)
    apply_overrides(g, ['--compile=false', '--init_from=123', "--init_from='quoted'"])
    assert g['compile'] is False and g['init_from'] == 'quoted'


@pytest.mark.parametrize('args,message', [
    (['--lerning_rate=1e-4'], "argument --lerning_rate=1e-4: unknown config key 'lerning_rate' "
                              r"\(did you mean 'learning_rate'\?\)"),
    (['--max_iters=1.5'], r"max_iters must be a int \(default 100\), got 1.5"),
    (['--compile=1'], r"compile must be a bool \(default False\), got 1"),
    (['--learning_rate=fast'], r"learning_rate must be a float \(default 0.0006\), got 'fast'"),
    (['--max_iters'], r"argument --max_iters: expected --key=value"),
    (['--zzz=1'], r"unknown config key 'zzz'$"),
    (['no_such_file.py'], r"config file no_such_file.py does not exist"),
    (['--learning_rate=1e999'], r"argument --learning_rate=1e999: learning_rate must be a finite number, got inf"),
    (['--max_iters=99999999999999999999999'], r"max_iters must fit in 64 bits \(-2\*\*63 <= max_iters < 2\*\*63\), "
                                               "got 99999999999999999999999"),
])
def test_mistakes_are_named(args, message):
    with pytest.raises(UserError, match=message):
        apply_overrides(script_globals(), args)


@pytest.mark.parametrize('text,message', [
    ("max_iters = 10\nlearning_rate = = 1\n", "{path}, line 2: syntax error"),
    ("max_iters = 10\n\nlearning_rate = base_lr * 2\n", "{path}, line 3: NameError: name 'base_lr' is not defined"),
    ("max_iter = 10\n", "config file {path}: unknown config key 'max_iter' (did you mean 'max_iters'?)"),
    ("compile = 'yes'\n", "config file {path}: compile must be a bool (default False), got 'yes'"),
    ("import sys\nmax_iters = 10\nsys.exit(0)\n", "{path}, line 3: calls sys.exit(): a config file sets values"),
    ("learning_rate = lambda: 0.5\n", "config file {path}: learning_rate is a function, and a setting is a value"),
    ("def schedule():\n    return 1\n", "config file {path}: schedule is a function, and a setting is a value"),
    ("learning_rate = float('inf')\n", "config file {path}: learning_rate must be a finite number, got inf"),
])
def test_broken_config_files_name_file_and_line(text, message, tmp_path):
    path = tmp_path / 'exp.py'
    path.write_text(text)
    with pytest.raises(UserError) as error:
        apply_overrides(script_globals(), [str(path)])
    assert str(error.value).startswith(message.format(path=path))


def test_a_config_file_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / 'exp.py'
    path.write_bytes(b"max_iters = 10\ninit_from = 'caf\xe9'\n")  # Latin-1
    with pytest.raises(UserError, match=rf"^{path}, line 2: not UTF-8 text \(byte 0xe9\)"):
        apply_overrides(script_globals(), [str(path)])


def test_a_missing_sft_run_is_named_with_the_command_that_makes_it(tmp_path, monkeypatch):
    from configurator import missing_run_hint
    monkeypatch.chdir(tmp_path)
    made_by = "; it is the out_dir of config/sft_synthetic.py: run python sft.py config/sft_synthetic.py first"
    assert missing_run_hint('out-sft-synthetic') == made_by
    (tmp_path / 'out-demo' / 'sft').mkdir(parents=True)
    (tmp_path / 'out-demo' / 'sft' / 'ckpt.pt').write_bytes(b'')  # after tools/demo.py
    assert missing_run_hint('out-sft-synthetic') == made_by + ", or start from the demo's SFT model with --init_from=out-demo/sft"
    assert missing_run_hint('no-such-run') == ''
