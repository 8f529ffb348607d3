"""How an interrupt ends the CLI: a recorded signal is raised once, in the main thread, and the exit is 130."""

from __future__ import annotations

import threading

import pytest

from sfedge import cli, progress


@pytest.fixture(autouse=True)
def _no_pending():
    progress.clear_interrupt()
    yield
    progress.clear_interrupt()


def test_a_recorded_signal_is_raised_once_at_the_next_report() -> None:
    progress.note_interrupt(2)
    with pytest.raises(KeyboardInterrupt):
        progress.tell(None, "working")
    progress.tell(None, "working")  # raised once: the CLI handles it, nothing raises it again


def test_a_report_from_a_worker_thread_does_not_consume_the_signal() -> None:
    progress.note_interrupt(2)
    seen: list[BaseException] = []

    def worker() -> None:
        try:
            progress.tell(None, "from a thread")
        except BaseException as e:  # noqa: BLE001 - the test records what the thread saw
            seen.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert not seen
    with pytest.raises(KeyboardInterrupt):  # the main thread still gets it
        progress.check_interrupt()


def test_an_interrupt_escaping_the_verb_handling_still_exits_130(monkeypatch) -> None:
    """A KeyboardInterrupt that escapes the CLI's own handling must not reach Python's exit (which would die by SIGINT)."""

    def late(argv):
        progress.note_interrupt(2)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_main", late)
    assert cli.main([]) == 130
    progress.check_interrupt()  # cleared: nothing raises it again while the process exits
