"""
nanoGPT's configurator, with early and clear errors. A script's config is its module-level globals;
the command line overrides them, left to right:

    python dpo.py config/dpo_synthetic.py --beta=0.2 --max_iters=100
    python dpo.py --help       # every setting, its default and what it is

A config file is plain Python whose top-level assignments become overrides; --key=value sets one key,
its value read as a Python literal (True, 3, 1e-5, 'text') or else taken as a plain string.
A key the script does not have, a value of the wrong type or out of its range, or a broken file
stops the run with one sentence naming the key or the file and line, before any work.

The story is configure() and what follows it down to config_keys; the checks it calls and
--help follow, and do what their names say.
"""

import ast
import difflib
import glob
import inspect
import io
import math
import os
import sys
import tokenize
import traceback
from typing import Callable, NamedTuple

from common import UserError, exit_with_error


class Settings(dict):
    """A script's settings, {key: value}; given: the keys a config file or --key=value set."""
    given = frozenset()


def configure(namespace, ranges=None, args=None, checks=()):
    """For a script's __main__: apply_overrides, then check_ranges and check_combinations; prints
    what changed and returns the Settings, or prints the one-line error and exits;
    --help (or -h) prints settings_help and exits."""
    args = sys.argv[1:] if args is None else args
    if '--help' in args or '-h' in args:
        print(settings_help(namespace))
        sys.exit(0)
    try:
        applied = apply_overrides(namespace, args)
        check_ranges(namespace, ranges or {})
        check_combinations(namespace, checks)
    except UserError as e:
        exit_with_error(e, prefix='config error')
    if os.environ.get('RANK', '0') == '0':  # under torchrun, one rank speaks for all
        for key, value in applied.items():
            print(f"config: {key} = {value!r}")
    settings = Settings(config_keys(namespace))
    settings.given = frozenset(applied)
    return settings


def apply_overrides(namespace, args):
    """Apply config files and --key=value arguments (in order) to namespace, a script's globals().
    Returns the dict of overrides applied; raises UserError on the first mistake."""
    known = config_keys(namespace)
    applied = {}
    for arg in args:
        if arg.startswith('--'):
            if '=' not in arg:
                raise UserError(f"argument {arg}: expected --key=value")
            key, text = arg[2:].split('=', 1)
            if key not in known:
                raise unknown_key(key, known, f"argument {arg}")
            overrides, source = {key: parse_value(text, known[key])}, f"argument {arg}"
        else:
            overrides, source = read_config_file(arg), f"config file {arg}"
            for key in overrides:
                if key not in known:
                    raise unknown_key(key, known, source)
        for key, value in overrides.items():
            applied[key] = namespace[key] = check_value(key, value, known[key], source)
    return applied


def read_config_file(path):
    """The top-level assignments of a Python config file, as a dict: every name but modules and
    those starting with '_' (a value of a type no setting has is refused later, by check_value)."""
    namespace = {}
    try:
        with open(path, 'rb') as f:
            exec(compile(f.read().decode('utf-8'), path, 'exec'), namespace)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # sys.exit() too: a config file cannot end the run
        raise config_file_error(path, e) from None
    overrides = {k: v for k, v in namespace.items() if not k.startswith('_') and not inspect.ismodule(v)}
    for key, value in overrides.items():  # never dropped without a word
        if inspect.isroutine(value) or inspect.isclass(value):
            kind = 'class' if inspect.isclass(value) else 'function'
            raise UserError(f"config file {path}: {key} is a {kind}, and a setting is a value (a "
                            "number, a string, True/False or None); compute it in the file instead")
    return overrides


def parse_value(text, default):
    """A --key=value value as users type it: Python literals, true/false in any case, or a string."""
    if isinstance(default, str) and not (len(text) >= 2 and text[0] == text[-1] and text[0] in '\'"'):
        return text  # a string key takes the text as it is: --out_dir=123 is the directory '123'
    if text.lower() in ('true', 'false'):
        return text.lower() == 'true'
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def config_keys(namespace):
    """The names a script's globals offer as config: plain values in lower case, not modules,
    functions or constants (EOT_TOKEN)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and k == k.lower() and isinstance(v, (bool, int, float, str, type(None)))}


# -------------------------------------------------------------------- the checks

def config_file_error(path, e):
    """The one line for a config file that could not be read or run (e), naming its line."""
    if not os.path.isfile(path):
        return UserError(f"config file {path} does not exist")
    lines = [fr.lineno for fr in traceback.extract_tb(e.__traceback__) if fr.filename == path]
    if isinstance(e, UnicodeDecodeError) and not lines:  # the file's own bytes, not its code's
        line = e.object[:e.start].count(b'\n') + 1
        return UserError(f"{path}, line {line}: not UTF-8 text (byte {e.object[e.start]:#04x}): a "
                         "config file is Python source, saved as UTF-8")
    if isinstance(e, SyntaxError):
        return UserError(f"{path}, line {e.lineno}: syntax error: {e.msg}")
    what = "calls sys.exit(): a config file sets values" if isinstance(e, SystemExit) else \
        f"{type(e).__name__}: {e}"
    return UserError(f"{path}, line {lines[-1]}: {what}" if lines else f"config file {path}: {what}")


def check_value(key, value, default, source):
    """value as the type of default (an int is accepted for a float key, as 1e-5 and 0 are both
    numbers to a user); a mismatch names the key, the type and the value given."""
    if isinstance(value, float) and not math.isfinite(value):  # 1e999 reads as inf
        raise UserError(f"{source}: {key} must be a finite number, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and not -2 ** 63 <= value < 2 ** 63:
        raise UserError(f"{source}: {key} must fit in 64 bits (-2**63 <= {key} < 2**63), got {value}")
    if default is None:  # a key that defaults to None (off) takes any value
        return value
    if isinstance(default, bool) or isinstance(value, bool):  # bool is an int to Python, not to users
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        hint = ''
        if isinstance(default, str) and isinstance(value, (list, tuple)):
            hint = f" (give a list as one comma-separated string: {','.join(map(str, value))!r})"
        raise UserError(f"{source}: {key} must be a {type(default).__name__} (default {default!r}), "
                          f"got {value!r}{hint}")
    return value


class Range(NamedTuple):
    """The values a setting may take, for what RANGES' words cannot say: a test, and its words."""
    ok: Callable
    words: str


def in_range(value, spec):
    """Whether value is one that spec allows. spec: a tuple of the values allowed; a Range; or words,
    one or more of '> 0', '>= 1', an interval '[0, 1)' or '(0, 1]', or a value ('-1', 'None'),
    joined by ' or ', each may be followed by a remark in brackets: '-1 (all) or >= 1'."""
    if isinstance(spec, Range):  # (a NamedTuple: before the tuple of values)
        return spec.ok(value)
    if isinstance(spec, tuple):
        return value in spec
    return any(in_one(value, part.split(' (')[0].strip()) for part in spec.split(' or '))


def in_one(value, words):
    if words.startswith('>'):
        bound = ast.literal_eval(words.lstrip('>=').strip())
        return value is not None and (value >= bound if words.startswith('>=') else value > bound)
    if words[0] in '[(' and words[-1] in '])':
        low, high = (ast.literal_eval(x.strip()) for x in words[1:-1].split(','))
        if value is None:
            return False
        return (low < value or (words[0] == '[' and value == low)) and \
            (value < high or (words[-1] == ']' and value == high))
    return value == ast.literal_eval(words)


def range_words(spec):
    if isinstance(spec, Range):
        return spec.words
    if isinstance(spec, tuple):
        return 'one of ' + ', '.join(map(str, spec))
    return ' or '.join(f"in {w}" if w[0] in '[(' else w for w in spec.split(' or '))


def check_ranges(namespace, ranges):
    """Raise UserError for the first setting of namespace outside its range in ranges."""
    for key, spec in ranges.items():
        value = namespace[key]
        if not in_range(value, spec):
            raise UserError(f"{key}={value!r} is out of range: it must be {range_words(spec)}")


def check_combinations(namespace, checks):
    """Raise UserError for the first of checks, (test of the settings, why), whose test holds; why
    may name settings in braces, '{n_head}', for their values."""
    for conflict, why in checks:
        if conflict(namespace):
            raise UserError(why.format_map(namespace))


def unknown_key(key, known, source):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"{source}: unknown config key '{key}'{hint}")


# -------------------------------------------------------------------- --help, and a hint for a missing run

def settings_help(namespace):
    """A script's --help: the first paragraph of its docstring, then every setting with its default
    and the comment beside it in the config block, under the block's section comments."""
    script = os.path.basename(namespace.get('__file__') or 'script.py')
    lines = [f"usage: python {script} [config/file.py ...] [--key=value ...]"]
    doc = (namespace.get('__doc__') or '').strip()
    if doc:
        first = doc.split('\n\n')[0]
        lines += ['', first[:-1] + '.' if first.endswith(':') else first]  # its ':' introduced an example left out
    comments, assigned = {}, {}  # line number -> (column, text); setting -> its line number
    path = namespace.get('__file__')
    if path and os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
            source = f.read()
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                comments[token.start[0]] = (token.start[1], token.string.lstrip('#').strip())
        for node in ast.parse(source).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                assigned.setdefault(node.targets[0].id, node.lineno)
    lines += ['', 'settings (--key=default, then what it is):']
    settings = sorted(config_keys(namespace).items(), key=lambda kv: assigned.get(kv[0], float('inf')))
    width = min(36, max(len(f"--{k}={v!r}") for k, v in settings))
    for key, default in settings:
        heading = comments.get(assigned.get(key, 0) - 1)
        if heading and heading[0] == 0 and not heading[1].startswith('---'):
            lines.append(f"  {heading[1]}")
        comment = comments.get(assigned.get(key))
        text = comment[1] if comment and comment[0] > 0 else ''
        lines.append(f"    {f'--{key}={default!r}':<{width}}  {text}".rstrip())
    return '\n'.join(lines)


def missing_run_hint(name):
    """For a model source that does not exist: the config in config/ whose out_dir it is, as the
    command that makes it (dpo.py config/hh.py starts from out-sft-hh, which sft.py makes)."""
    if os.path.exists(name):
        return ''
    configs = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', '*.py')
    for path in sorted(glob.glob(configs)):
        try:
            out = read_config_file(path).get('out_dir')
        except UserError:
            continue
        if out == name.rstrip('/'):
            script = 'sft.py' if os.path.basename(path).startswith('sft') else 'dpo.py'
            config = os.path.basename(path)
            demo = ('' if config != 'sft_synthetic.py' or not os.path.isfile('out-demo/sft/ckpt.pt') else
                    ", or start from the demo's SFT model with --init_from=out-demo/sft")
            return f"; it is the out_dir of config/{config}: run python {script} config/{config} first{demo}"
    return ''
