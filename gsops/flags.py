"""Environment flags, read by one rule.

:func:`env_flag` reads a yes/no variable:

* unset: the default;
* ``0``, ``false``, ``no``, ``off`` or the empty string: False;
* ``1``, ``true``, ``yes``, ``on``: True;

case-insensitive, surrounding whitespace ignored. Any other value raises ValueError naming the
variable and the accepted values (a typo never silently picks a side).

:func:`env_choice` reads a variable that names one of a few choices, by the same conventions
(unset or empty: the default; case-insensitive; anything else raises).

``setup.py`` cannot import gsops while it builds and carries a copy of :func:`env_flag`'s
rule; tests/test_flags.py checks that the two agree.
"""
from __future__ import annotations

import os

FALSE_WORDS = ("0", "false", "no", "off", "")
TRUE_WORDS = ("1", "true", "yes", "on")


def parse_flag(name: str, value: str) -> bool:
    """The value of flag ``name`` spelled ``value`` (the rule of :func:`env_flag`)."""
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{name}={value!r} must be 1, true, yes or on (on), or 0, false, no, off or empty (off), "
                     "in any case")


def env_flag(name: str, default: bool) -> bool:
    """Whether the environment variable ``name`` is on; ``default`` when it is unset."""
    value = os.environ.get(name)
    if value is None:
        return bool(default)
    return parse_flag(name, value)


def env_choice(name: str, choices, default: str) -> str:
    """The choice the environment variable ``name`` names (lower-cased), ``default`` when unset or empty.

    Raises ValueError naming the variable and the choices for any other value."""
    choices = tuple(choices)
    if default not in choices:
        raise ValueError(f"default={default!r} must be one of {choices}")
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    word = value.strip().lower()
    if word not in choices:
        raise ValueError(f"{name}={value!r} must be one of {', '.join(choices)} (case-insensitive)")
    return word
