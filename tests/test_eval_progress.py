"""Live progress for eval loops: periodic plain lines in a log, a tqdm bar with the same counts on a terminal."""

from __future__ import annotations

import io

from eval.progress import Progress


def test_plain_lines_count_done_failures_by_reason_and_retries():
    log = io.StringIO()
    with Progress(total=5, what="judge calls", stream=log, interval=0.0) as progress:
        progress.update()
        progress.update(failed="timeout", retries=2)
        progress.update(failed="http_500", retries=3)
        progress.update(failed="timeout")
        progress.update(retries=1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 6  # one per update (interval 0) and the final line
    assert lines[1].startswith("judge calls: 2/5 done, failed 1 (timeout 1), retried 2, ")
    assert lines[-1].startswith("judge calls: 5/5 done, failed 3 (timeout 2, http_500 1), retried 6, ")


def test_a_log_gets_a_line_per_interval_only():
    log = io.StringIO()
    with Progress(total=100, what="answers", stream=log, interval=3600.0) as progress:
        for _ in range(100):
            progress.update()
    assert log.getvalue().splitlines() == [log.getvalue().splitlines()[-1]]
    assert log.getvalue().startswith("answers: 100/100 done, failed 0, retried 0")


def test_a_terminal_gets_a_bar_with_the_counts():
    screen = io.StringIO()
    with Progress(total=4, what="judge calls", stream=screen, terminal=True) as progress:
        for reason in (None, "timeout", None, None):
            progress.update(failed=reason, retries=1)
    shown = screen.getvalue()
    assert "judge calls" in shown and "4/4" in shown and "failed 1 (timeout 1), retried 4" in shown
