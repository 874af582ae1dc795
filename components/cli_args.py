"""Command-line plumbing shared by every CLI of the project (``clipa`` and ``python -m components.*``).

One parser for ``KEY=VALUE`` items (``--param``, ``--label``, ``--input``, ``--set``, ``--option``)
and one way to type their values: as the KFP input spec says (pipeline and component
parameters), or as JSON with a plain-string fallback (``--set lr=1e-3``, Beam options).
"""
from __future__ import annotations

import argparse
import json
from typing import Callable, Mapping


def key_value(flag: str, value_name: str = "VALUE") -> Callable[[str], tuple[str, str]]:
    """An argparse ``type=`` that splits ``KEY=VALUE`` and names ``flag`` in its error."""
    def parse(text: str) -> tuple[str, str]:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"{flag} expects KEY={value_name}, got {text!r}")
        return key.strip(), value.strip()
    parse.__name__ = f"{flag.lstrip('-')} KEY={value_name}"  # argparse names the type in errors
    return parse


def json_or_str(value: str):
    """``"3"`` -> 3, ``"true"`` -> True, ``"[1, 2]"`` -> [1, 2]; anything else stays a string."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def as_list(value: str) -> list:
    """A JSON list, or comma-separated strings."""
    if value.lstrip().startswith("["):
        return json.loads(value)
    return [v.strip() for v in value.split(",") if v.strip()]


# KFP parameter types (InputSpec.type) -> how a command-line string becomes one.
_CASTS: dict[str, Callable[[str], object]] = {
    "Integer": int, "Float": float, "String": str, "List": as_list, "Dict": json.loads,
    "Boolean": lambda v: v.lower() in ("1", "true", "yes")}


def typed_params(pairs: list[tuple[str, str]], inputs: Mapping, what: str = "pipeline parameter") -> dict:
    """``KEY=VALUE`` pairs typed as a KFP component spec's ``inputs`` declare them.

    Args:
        pairs: (key, value) strings from ``--param``.
        inputs: a component spec's ``inputs`` (name -> InputSpec with ``.type``).
        what: how errors name a key ("pipeline parameter", "evaluate parameter", ...).
    Raises:
        ValueError: an unknown key (the error lists the known ones) or a value of the wrong type.
    """
    out = {}
    for key, value in pairs:
        if key not in inputs:
            raise ValueError(f"unknown {what} {key!r}; known: {', '.join(sorted(inputs))}")
        cast = _CASTS.get(inputs[key].type, str)
        try:
            out[key] = cast(value)
        except ValueError:
            raise ValueError(f"--param {key}={value!r}: expected a {inputs[key].type}") from None
    return out


def json_items(pairs: list[tuple[str, str]], known: Mapping | None = None, what: str = "option") -> dict:
    """``KEY=VALUE`` pairs with JSON-or-string values; ``known`` (if given) limits the keys."""
    out = {}
    for key, value in pairs:
        if known is not None and key not in known:
            raise ValueError(f"unknown {what} {key!r}; known: {', '.join(sorted(known))}")
        out[key] = json_or_str(value)
    return out
