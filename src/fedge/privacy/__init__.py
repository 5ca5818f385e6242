"""Differential privacy: clipping and noise mechanisms, adaptive clipping, accounting, the budget.

Modules: :mod:`~fedge.privacy.mechanisms` (clip, Gaussian noise, the noise
generator), :mod:`~fedge.privacy.adaptive` (Andrew et al. 2021),
:mod:`~fedge.privacy.distributed` (each device's share of the noise on the
quantization grid), :mod:`~fedge.privacy.accounting` (over ``dp-accounting``,
imported lazily) and :mod:`~fedge.privacy.session` (one run's mechanism,
ledger and budget, driven by the simulator and the coordinator alike).
All pure: no I/O, no clock; generators are arguments. This package
imports nothing heavy at import time, so the agent may use the mechanisms.
See docs/privacy.md.
"""
