"""Config fields that carry their own flag and their own check.

A field declared with ``setting(...)`` holds, beside its default, what the command line needs
(help, group, choices, how to parse the text, whether ``--help`` shows it) and the rule that
validates it. ``flags.py`` builds every parser from these, and ``validate`` checks a config
against them, so a setting is declared once::

    epochs: int = setting(3, "passes over the training pairs", rule=POSITIVE_INT, essential=True)

No heavy imports: ``sharelora --help`` reads these without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Rule:
    """``ok(value)`` is true for valid values; ``says`` (or what it returns, when the
    choices can grow) completes "NAME ..., got VALUE"."""

    ok: Callable[[Any], bool]
    says: str | Callable[[], str]


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


POSITIVE_INT = Rule(lambda v: _int(v) and v >= 1, "must be a positive integer")
POSITIVE_INT_OR_NONE = Rule(
    lambda v: v is None or (_int(v) and v >= 1), "must be a positive integer or None"
)
COUNT = Rule(lambda v: _int(v) and v >= 0, "must be an integer >= 0")
POSITIVE = Rule(lambda v: _number(v) and v > 0, "must be a positive number")
NON_NEGATIVE = Rule(lambda v: _number(v) and v >= 0, "must be a number >= 0")
FRACTION = Rule(lambda v: _number(v) and 0 <= v < 1, "must be in [0, 1)")
BOOL = Rule(lambda v: isinstance(v, bool), "must be true or false")


def one_of(choices) -> Rule:
    """``choices`` may be a registry that grows (``config.METHODS``): read at check time."""
    return Rule(lambda v: v in choices, lambda: f"must be one of {', '.join(map(str, choices))}")


def number_or_auto(text: str) -> float | str:
    """The parse of a flag that takes a number or ``auto``."""
    return text if text == "auto" else float(text)


def setting(
    default,
    help: str,
    *,
    group: str,
    rule: Rule | None = None,
    choices: tuple | None = None,
    parse: Callable[[str], Any] | None = None,
    essential: bool = False,
    flag: bool = True,
    aliases: tuple[str, ...] = (),
    metavar: str | None = None,
):
    """A dataclass field with its flag (``--name-with-dashes``) and check.

    Args:
        default: the default value (the one place it is written).
        help: what the setting does, for ``--help`` and the docs.
        group: the ``--help-all`` heading it is listed under.
        rule: the check (``validate``); ``choices`` give ``one_of(choices)``.
        parse: turns the flag's text into the value (default: the default's type).
        essential: listed by plain ``--help`` (the rest by ``--help-all``).
        flag: ``False`` for a library-only setting (set by a preset or in code, no flag).
        aliases: other spellings of the flag.
    """
    if choices is not None and rule is None:
        rule = one_of(choices)
    if isinstance(default, bool) and rule is None:
        rule = BOOL
    meta = {
        "help": help,
        "group": group,
        "rule": rule,
        "choices": choices,
        "parse": parse,
        "essential": essential,
        "flag": flag,
        "aliases": aliases,
        "metavar": metavar,
    }
    return field(default=default, metadata=meta)


def validate(config) -> None:
    """Check every field of ``config`` against its rule; the message names the fix."""
    for f in fields(config):
        rule = f.metadata.get("rule")
        value = getattr(config, f.name)
        if rule is not None and not rule.ok(value):
            says = rule.says() if callable(rule.says) else rule.says
            raise ValueError(f"{f.name} {says}, got {value!r}")
