"""quantkit's benchmarks, side by side with the peers; each module is one benchmark (``python -m bench.NAME``,
``make bench-NAME``), results in ``reports/bench/``. ``bench.common`` holds what they share."""
