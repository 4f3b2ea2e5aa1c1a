"""The benchmark suite: ``pytest bench/ --benchmark-only`` (options and tables: ``bench/conftest.py``;
the ways: ``bench/suite.py``). Every way of a group runs on the same inputs in one session, so the
ratios printed at the end compare like with like."""

import pytest
import suite


@pytest.mark.parametrize("way", suite.WAYS["kd_loss"])
def test_kd_loss(benchmark, bench, way):
    bench.run(benchmark, "kd_loss", way)


@pytest.mark.parametrize("way", suite.WAYS["cross_entropy"])
def test_cross_entropy(benchmark, bench, way):
    bench.run(benchmark, "cross_entropy", way)


@pytest.mark.parametrize("way", suite.WAYS["prompt_pair"])
def test_prompt_pair(benchmark, bench, way):
    bench.run(benchmark, "prompt_pair", way)


@pytest.mark.parametrize("way", suite.WAYS["sparse_kd"])
def test_sparse_kd(benchmark, bench, way):
    bench.run(benchmark, "sparse_kd", way)


@pytest.mark.parametrize("way", suite.WAYS["topk"])
def test_topk(benchmark, bench, way):
    bench.run(benchmark, "topk", way)
