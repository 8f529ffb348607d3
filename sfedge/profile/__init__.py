"""The profiler: latency and memory of artifacts on the device, SFConv vs vanilla paired.

Modules, in the direction data flows:

* :mod:`~sfedge.profile.types`: what to measure (``Subject``), how
  (``MeasureConfig``, also the CLI options) and the results (``Measurement``,
  ``Pairing``); :mod:`~sfedge.profile.subjects` finds subjects in bundles and
  pairs SFConv with vanilla;
* :mod:`~sfedge.profile.worker` (the per-configuration subprocess) and
  :mod:`~sfedge.profile.client` (the parent's side of it);
* :mod:`~sfedge.profile.schedule`: single, paired (A B B A ...) and rotating
  measurement over worker processes;
* :mod:`~sfedge.profile.stats` (summaries, bootstrap CI of a ratio of medians)
  and :mod:`~sfedge.profile.memory`;
* :mod:`~sfedge.profile.tables` (rows and Markdown shared by every output),
  :mod:`~sfedge.profile.plots`, :mod:`~sfedge.profile.report` (one run),
  :mod:`~sfedge.profile.compare` (several devices) and
  :mod:`~sfedge.profile.remote` (SSH).

The rank sweep, which builds models as well as measuring them, is
:mod:`sfedge.sweep`.  This package imports nothing heavy on import (the worker
starts from it), and nothing in it imports torch: it is the device path.
"""
