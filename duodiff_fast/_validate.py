"""Argument checks shared by every public entry point (sampler, solvers, schedules, ops, CLI).

Every failure raises `ArgumentError`, which is both a ValueError and a TypeError (a wrong type and a
wrong value are one mistake to the caller), with a message naming the argument, showing the value and
saying what is allowed. NumPy scalars are accepted wherever Python numbers are; bools are never numbers
and strings are never coerced (`steps='4'` is refused, not parsed).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["ArgumentError", "check_int", "check_float", "check_choice", "describe"]


class ArgumentError(ValueError, TypeError):
    """A public function was called with an argument it does not accept."""


def describe(value) -> str:
    """`value` as it appears in an error message: its repr (shortened) and, for non-builtins, its type."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    if isinstance(value, (bool, int, float, str, type(None))):
        return text
    return f"{text} ({type(value).__name__})"


def _scalar(value):
    """Unwrap NumPy scalars and 0-d arrays/tensors to Python numbers; anything else unchanged."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad:
        return value.item()
    return value


def check_int(value, name: str, *, minimum: int | None = None, maximum: int | None = None,
              where: str = "") -> int:
    """`value` as an int, or ArgumentError. Integral floats (2.0) are refused like 2.5: a count written as
    a float is usually a computed value gone wrong."""
    prefix = f"{where}: " if where else ""
    v = _scalar(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ArgumentError(f"{prefix}{name} must be an integer, got {describe(value)}")
    v = int(v)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        if maximum is None:
            bound = f"{name} >= {minimum}"
        elif minimum is None:
            bound = f"{name} <= {maximum}"
        else:
            bound = f"{name} in [{minimum}, {maximum}]"
        raise ArgumentError(f"{prefix}need an integer {bound}, got {name}={v}")
    return v


def check_float(value, name: str, *, minimum: float | None = None, maximum: float | None = None,
                exclusive_minimum: bool = False, where: str = "") -> float:
    """`value` as a finite float, or ArgumentError (NaN and infinities are refused)."""
    prefix = f"{where}: " if where else ""
    v = _scalar(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ArgumentError(f"{prefix}{name} must be a number, got {describe(value)}")
    v = float(v)
    if not math.isfinite(v):
        raise ArgumentError(f"{prefix}{name} must be a finite number, got {v}")
    low_ok = minimum is None or (v > minimum if exclusive_minimum else v >= minimum)
    high_ok = maximum is None or v <= maximum
    if not (low_ok and high_ok):
        lo = "" if minimum is None else (f"> {minimum:g}" if exclusive_minimum else f">= {minimum:g}")
        hi = "" if maximum is None else f"<= {maximum:g}"
        raise ArgumentError(f"{prefix}need {name} {' and '.join(p for p in (lo, hi) if p)}, got {name}={v:g}")
    return v


def check_choice(value, name: str, choices, *, where: str = "", case_insensitive: bool = True) -> str:
    """`value` as one of `choices` (strings); case is folded when `case_insensitive`."""
    prefix = f"{where}: " if where else ""
    allowed = ", ".join(map(repr, choices))
    if not isinstance(value, str):
        raise ArgumentError(f"{prefix}{name} must be one of {allowed}, got {describe(value)}")
    key = value.strip().lower() if case_insensitive else value
    table = {(c.lower() if case_insensitive else c): c for c in choices}
    if key not in table:
        raise ArgumentError(f"{prefix}unknown {name} {value!r}; expected one of {allowed}")
    return table[key]


# ------------------------------------------------------------------------------------------------------
# argparse types: the same checks at the command line (argparse turns ArgumentTypeError into a usage error)
# ------------------------------------------------------------------------------------------------------

def argtype_int(minimum: int | None = None, maximum: int | None = None):
    """An argparse `type=` for integers in [minimum, maximum]."""
    import argparse

    def parse(text):
        try:
            value = int(text, 10)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            lo = "" if minimum is None else f">= {minimum}"
            hi = "" if maximum is None else f"<= {maximum}"
            raise argparse.ArgumentTypeError(f"need an integer {' and '.join(p for p in (lo, hi) if p)}, "
                                             f"got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def argtype_float(minimum: float | None = None, maximum: float | None = None, exclusive_minimum: bool = False):
    """An argparse `type=` for finite floats in the given range."""
    import argparse

    def parse(text):
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return check_float(value, "value", minimum=minimum, maximum=maximum,
                               exclusive_minimum=exclusive_minimum)
        except ArgumentError as e:
            raise argparse.ArgumentTypeError(str(e).replace("value ", "").replace("value=", "")) from None
    parse.__name__ = "number"
    return parse
