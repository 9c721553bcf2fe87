"""Throughput benchmark of CART decoding against dual-tower and FAISS search (CART, Fang et al.,
ACL 2025, Figure 4 analogue), split by concern:

- :mod:`cartlib.bench.galleries`: galleries of N candidates sampled from a task's real features,
  identified by its CART identifier model;
- :mod:`cartlib.bench.queries`: the benchmark's queries and their length-bucketed encoding;
- :mod:`cartlib.bench.timing`: the timing harness (warm-up, sync, interleaved repeats, medians,
  peak memory, the allocator setting);
- :mod:`cartlib.bench.measure`: every system on one gallery;
- :mod:`cartlib.bench.analysis`: decoder FLOPs, the crossover, the summary of the targets.

The decoder is :class:`cartlib.decode.BeamDecoder` (the suite's one beam search), the dual-tower
and FAISS systems are :mod:`cartlib.baselines`; the stage is :mod:`cartlib.stages.throughput`,
its figure :func:`cartlib.viz.throughput_figure`.
"""
