"""Trace ingestion, pure logic with no broker: trace events mapped to catalog ops (opmap.py), and a
trace turned into kernel.stats plus its hot unmapped ops (stats.py). Reading and checking trace
files is shared/tracefiles.py, which the command line uses too. The observer service (observer/app.py) and the SDK's sampling observer
(observer/sdk/sampling.py) both use it."""
