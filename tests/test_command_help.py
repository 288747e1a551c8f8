"""Every command's `--help`: each option states its default once, or not at all."""

import re

import pytest

from tests.helpers import COMMANDS, command_help, option_helps


@pytest.mark.parametrize("module", COMMANDS)
def test_each_option_states_its_default_at_most_once(module):
    for option, text in option_helps(command_help(module)).items():
        assert len(re.findall(r"\bdefault\b", text)) <= 1, f"{module} {option}: {text}"
        assert "(default: None)" not in text, f"{module} {option}: {text}"
