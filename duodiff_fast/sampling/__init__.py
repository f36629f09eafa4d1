"""Noise schedules, solvers, the DuoDiff shallow-then-deep sampler (built from segments, replayed as CUDA
graphs on a GPU), and the early-exit baseline with its profile and switch calibration."""
from .duo import AtTimestep, DuoSampler, SampleTrace, shallow_steps
from .early_exit import EarlyExitSampler, calibrate_switch, profile_exits
from .schedules import Schedule, get_schedule
from .solvers import get_solver

__all__ = ["AtTimestep", "DuoSampler", "SampleTrace", "shallow_steps", "Schedule", "get_schedule", "get_solver",
           "EarlyExitSampler", "profile_exits", "calibrate_switch"]
