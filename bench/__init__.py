"""corral's benchmarks: ``make bench`` (or ``python -m bench [NAME ...]``).

Every figure is reported against a baseline measured in the same run, on the same machine,
and written to ``bench/results/<name>.json``; ``docs/benchmarks.md`` holds the last figures.
"""
