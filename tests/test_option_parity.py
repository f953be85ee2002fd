"""Every option sd-scripts' training scripts take is an option of ours too, with a --help line.

The lists in tests/data/sd_scripts_options/ are the option names of each upstream script's --help
(kohya-ss/sd-scripts 48d368fa). An option that cannot apply here must still be accepted and then refused
with a one-line reason before anything loads (see test_refused_options_say_why), never "unrecognized".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.recipe_infos import SCRIPTS, parser_for

LISTS = Path(__file__).parent / "data" / "sd_scripts_options"


def upstream_options(script: str) -> set[str]:
    lines = (LISTS / f"{script}.txt").read_text(encoding="utf-8").splitlines()
    return {line.strip() for line in lines if line.startswith("--")}


def our_actions(script: str) -> dict[str, object]:
    return {name: action for action in parser_for(script)._actions for name in action.option_strings}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_sd_scripts_option_is_accepted(script):
    upstream = upstream_options(script)
    assert len(upstream) > 150  # the list is whole, not a stub
    missing = sorted(upstream - set(our_actions(script)))
    assert not missing, f"{script}.py lacks {len(missing)} option(s) of sd-scripts: {' '.join(missing)}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_help(script):
    actions = our_actions(script)
    without = sorted(name for name, action in actions.items() if name.startswith("--") and not action.help)
    assert not without, f"{script}.py options without --help text: {without}"
