"""benchmarks/generation.py: the parts that run without the real models."""

from __future__ import annotations

import operator
import os

from conftest import load_benchmark


def test_a_child_process_returns_its_result():
    generation = load_benchmark("generation")
    assert generation.in_child_process(operator.add, 2, 3, crashed={"error": "crashed"}) == 5


def test_a_child_that_dies_is_reported_not_fatal():
    # os.abort kills the child with SIGABRT, as a fault inside llama.cpp's native library would.
    generation = load_benchmark("generation")
    assert generation.in_child_process(os.abort, crashed={"error": "crashed"}) == {"error": "crashed"}
