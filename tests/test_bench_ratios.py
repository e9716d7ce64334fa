"""bench/round_overhead.py's interleaved ratios: each simulation against the references beside it."""

import pytest

from bench.round_overhead import interleaved_ratios


def test_each_run_is_divided_by_the_ideal_of_the_references_around_it() -> None:
    # references 6, 4, 8 s on 2 workers: ideals 2.5 s (between 6 and 4) and 3 s (between 4 and 8)
    assert interleaved_ratios([5.0, 3.0], [6.0, 4.0, 8.0], workers=2) == [2.0, 1.0]


def test_one_run_uses_the_mean_of_before_and_after() -> None:
    assert interleaved_ratios([4.31], [5.5, 5.0], workers=2) == [pytest.approx(4.31 / 2.625)]


def test_references_must_surround_every_run() -> None:
    with pytest.raises(ValueError, match="2 timed runs need 3 references"):
        interleaved_ratios([1.0, 2.0], [1.0, 2.0], workers=2)
