"""Every config file in config/ parses against its script: no unknown keys, no wrong types."""

import glob
import os

import pytest

import dpo
import sft
from configurator import apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'config', '*.py')))


def test_there_are_configs():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_parses(path):
    script = sft if os.path.basename(path).startswith('sft') else dpo
    applied = apply_overrides(dict(vars(script)), [path])
    assert applied and 'init_from' in applied
