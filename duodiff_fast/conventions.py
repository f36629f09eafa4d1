"""Facts every layer shares, listed once: the time conventions a network can be fed, the schedule kind
each one fits, and the label range of a class-conditional model.

A model's *time convention* says what number the network sees for schedule time t (DESIGN.md §4):
  'int'      discrete t as a float (DiT, U-ViT-H: t + the schedule's t_offset)
  'frac1000' discrete t / 1000 (DuoDiff's recipe, the demo pair)
  'cont999'  continuous t in (0, 1] as t * 999 (official U-ViT VP-SDE models)
Imported by the models (which check their convention), the schedules (which apply it) and training
(which picks one for its schedule); nothing here imports the rest of the package.
"""
from __future__ import annotations

# convention -> the schedule kind it fits
TIME_CONVENTIONS = {"int": "discrete", "frac1000": "discrete", "cont999": "continuous"}


def allowed_conventions(kind: str) -> tuple:
    """The conventions that fit a schedule of `kind` ('discrete' or 'continuous')."""
    return tuple(c for c, k in TIME_CONVENTIONS.items() if k == kind)


def default_convention(kind: str) -> str:
    """What training picks when a spec's own convention does not fit its schedule."""
    return "frac1000" if kind == "discrete" else "cont999"


def check_time_convention(convention, kind: str | None = None, what: str = "time_convention"):
    """Raise ValueError unless `convention` is known (and, given `kind`, fits that schedule kind)."""
    if convention not in TIME_CONVENTIONS:
        raise ValueError(f"{what} must be one of {tuple(TIME_CONVENTIONS)}, got {convention!r}")
    if kind is not None and TIME_CONVENTIONS[convention] != kind:
        raise ValueError(f"{what} {convention!r} does not fit a {kind} schedule; use one of "
                         f"{allowed_conventions(kind)}")
    return convention


def label_range(num_classes: int, null_class) -> int:
    """Real class labels are [0, label_range): the null class of guidance is not one of them when it is
    the last label of the table (U-ViT's ImageNet models train 1001 labels, 1000 meaning "no class");
    DiT's null label sits past the table's classes (index num_classes), so all classes are real."""
    num_classes = int(num_classes or 0)
    return null_class if null_class is not None and null_class < num_classes else num_classes
