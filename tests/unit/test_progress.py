"""Progress off a terminal: a log line per interval, with counts, and silence for short loops."""

import logging

from wsss.utils.progress import progress_reporter


def _clock(times):
    it = iter(times)
    return lambda: next(it)


def test_off_a_terminal_a_long_loop_logs_its_count_every_interval(caplog):
    # start at 0; items 1..5 end at 10, 31, 40, 65, 70 s; the final line reads the clock once more (71)
    wrap = progress_reporter("check train", interval=30.0, clock=_clock([0, 10, 31, 40, 65, 70, 71]))
    with caplog.at_level(logging.INFO, logger="wsss"):
        assert list(wrap([1, 2, 3, 4, 5])) == [1, 2, 3, 4, 5]
    assert [r.getMessage() for r in caplog.records] == [
        "check train: 2/5 (40 %), 31 s",
        "check train: 4/5 (80 %), 65 s",  # next line due 30 s after the last one (61), not after the start
        "check train: 5 done in 71 s",
    ]


def test_off_a_terminal_a_short_loop_or_one_without_length_logs_accordingly(caplog):
    with caplog.at_level(logging.INFO, logger="wsss"):
        assert list(progress_reporter("evaluate val", clock=_clock([0, 5, 29]))([7, 8])) == [7, 8]
        assert caplog.records == []
        gen = (x for x in range(2))
        assert list(progress_reporter("predict", interval=1.0, clock=_clock([0, 3, 4, 5]))(gen)) == [0, 1]
    assert [r.getMessage() for r in caplog.records] == ["predict: 1, 3 s", "predict: 2, 4 s", "predict: 2 done in 5 s"]
