"""bench.batch_caption reads stock run_batch's rate from its one-second progress stamps, and says when it cannot."""

from __future__ import annotations

from bench.batch_caption import stock_steady_rate


def test_rate_after_the_first_quarter_from_progress_stamps() -> None:
    log = "Completed | 0/100 [00:00< ... Completed | 30/100 [00:01< ... Completed | 100/100 [00:08<"
    assert stock_steady_rate(log) == 10.0  # 70 requests over the 7 s after the stamp that passed a quarter


def test_a_batch_done_within_the_stamps_resolution_has_no_rate() -> None:
    # The bundled model finished 128 requests in 2 s: start and end fall in one or two stamps.
    assert stock_steady_rate("Completed | 0/128 [00:00< Completed | 128/128 [00:02<") is None
