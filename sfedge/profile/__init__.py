"""The profiler: latency and memory of artifacts on the device, SFConv vs vanilla paired.

Modules: :mod:`~sfedge.profile.stats` (summaries, bootstrap CI of a ratio of
medians), :mod:`~sfedge.profile.worker` (the per-configuration subprocess),
:mod:`~sfedge.profile.measure` (single and paired orchestration),
:mod:`~sfedge.profile.memory`, :mod:`~sfedge.profile.report` (JSON, CSV,
Markdown, terminal table), :mod:`~sfedge.profile.plots`,
:mod:`~sfedge.profile.compare` (several devices), :mod:`~sfedge.profile.remote`
(SSH) and :mod:`~sfedge.profile.sweep` (rank sweep, Pareto front).

This package imports nothing heavy on import (the worker starts from it), and
nothing on the device path imports torch.
"""
