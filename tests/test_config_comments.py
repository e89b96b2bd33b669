"""config.field_comments: the help text of a config field, including continuation lines ('#' and three spaces)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_lib.core import config


@dataclass
class Example:
    """A config with every comment layout the parser meets."""

    # a section heading: belongs to no field
    short: int = 1  # one-line help
    long: float = 0.5  # help that goes on
    #   over two lines
    # another heading, not a continuation (one space after its '#')
    after: str = "x"  # help
    bare: bool = True


def test_help_joins_aligned_continuation_lines_and_ignores_headings():
    assert config.field_comments(Example) == {
        "short": "one-line help",
        "long": "help that goes on over two lines",
        "after": "help",
    }
