"""Noise schedules, solvers and the DuoDiff shallow-then-deep sampler."""
from .duo import AtTimestep, DuoSampler, SampleTrace, shallow_steps
from .schedules import Schedule, get_schedule
from .solvers import get_solver

__all__ = ["AtTimestep", "DuoSampler", "SampleTrace", "shallow_steps", "Schedule", "get_schedule", "get_solver"]
