"""Benchmarks of lightning-flatness: cost ratios against a gradient, naive loops and the peers.

Run ``python -m benchmarks`` (``--quick`` for a smoke run, ``--device cuda`` on a GPU); see
``benchmarks/run.py`` and the generated ``benchmarks/RESULTS.md``.
"""
