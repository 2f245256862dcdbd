"""Process-wide runtime settings of the gateway and the HQ bridge: CPython's garbage collector.

A quote allocates a few thousand small containers (lines, discounts, receipt
rows, the sale record) that die young, by reference counting. With CPython's
default gen-0 threshold (700 allocations) one quote of a large basket runs
several gen-0 collections, and every ~100 quotes a full collection walks
every object alive: the rule set and everything else loaded. That is most of
a quote's p99 (bench/quote_workload.py, 2,000 quotes with the defaults: ~3,700
gen-0, ~340 gen-1 and 30 full collections of ~3.1 ms each; with ``tune_gc``:
none at all, since a quote's peak of live containers, ~3,000, stays under
the threshold).

``tune_gc()`` collects once, freezes what survives (the rules just loaded, the
modules) into the permanent generation so later collections never walk it,
and raises the gen-0 threshold so a quote seldom triggers a collection at all.
The HQ bridge has the same shape: decoding and applying a batch of 500
records allocates some 50,000 containers that die with the batch, and with
the defaults the collector walked the bridge's whole heap many times a batch
(bench/hq_ingest.py measures it). The bridge calls ``tune_gc`` once its
ledger is open.

Cyclic garbage is still collected, only less often; objects freed by
reference counting (nearly all) are freed at once as always. Call it at
start, after the rules are loaded, and again after a rule-set switch (it
unfreezes first, so a replaced rule set's cycles are collected then).
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 20_000  # allocations between gen-0 collections (CPython's default: 700)


def tune_gc() -> None:
    gc.unfreeze()  # a previous freeze: let the old rule set's garbage go now
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
