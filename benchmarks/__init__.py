"""Benchmarks (not tests): each module runs ours and a baseline in one process and prints one JSON document.

Contract for a module ``benchmarks/NAME.py``: runnable as ``python -m benchmarks.NAME [--quick]``, printing exactly
one JSON document on stdout; ``--quick`` keeps it to seconds for ``make bench`` (``python -m benchmarks``).
"""
