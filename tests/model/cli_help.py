"""A check shared by the CLI tests: ``--help`` documents every option."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest


def assert_every_option_documented(
    parser: argparse.ArgumentParser,
    main: Callable[[list[str]], int],
    capsys: pytest.CaptureFixture[str],
) -> list[str]:
    """Each option has a help text and ``main(["--help"])`` prints it and exits 0.

    Returns the options' long names.
    """
    options = [action for action in parser._actions if action.option_strings]
    for action in options:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    names = [action.option_strings[-1] for action in options]
    for name in names:
        assert name in text
    return names
