"""microvmc's benchmarks: each compares microvmc with a baseline measured in the same run.
See bench/README.md; `python3 -m bench` runs them all."""
