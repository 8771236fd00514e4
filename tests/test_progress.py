"""Progress within a round: a bar on a terminal, plain lines elsewhere, nothing extra for short rounds."""

from __future__ import annotations

import io
import threading
from types import SimpleNamespace

from fedlora.serving.progress import RoundProgress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_short_round_prints_nothing_when_not_a_terminal() -> None:
    out, clock = io.StringIO(), Clock()
    progress = RoundProgress(out, every=30, clock=clock)
    assert not progress.bar  # a StringIO is not a terminal
    progress.begin("round 1", 10)
    for done in range(11):
        clock.now += 2
        progress.update(done)
    progress.end()
    assert out.getvalue() == ""


def test_a_long_round_prints_a_plain_line_every_interval_until_all_reported() -> None:
    out, clock = io.StringIO(), Clock()
    progress = RoundProgress(out, every=30, clock=clock)
    progress.begin("round 3", 10)
    for seconds, done in [(10, 1), (31, 4), (45, 4), (62, 7), (95, 10), (130, 10)]:
        clock.now = 100.0 + seconds
        progress.update(done)
    progress.end()
    assert out.getvalue().splitlines() == [
        "[fedlora] round 3: 4/10 clients reported, 31 s so far",
        "[fedlora] round 3: 7/10 clients reported, 62 s so far",
    ]  # none at 95 s: every client had reported


def test_on_a_terminal_a_bar_counts_clients_and_is_erased_at_the_end() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    progress = RoundProgress(out)
    assert progress.bar
    progress.begin("round 2", 5)
    progress.update(3)
    progress.update(3)
    progress.end()
    text = out.getvalue()
    assert "[fedlora] round 2: 3/5 clients" in text  # the bar as it was drawn
    *_, last_bar, blanks, after = text.split("\r")
    assert last_bar.startswith("[fedlora] round 2: 3/5") and after == ""
    assert blanks.strip() == "" and len(blanks) >= len(last_bar)  # erased (leave=False): the round's line follows
    assert "clients reported" not in text  # no plain lines on a terminal


def test_the_grid_transport_reports_each_reply_as_it_arrives() -> None:
    from fedlora.flower.grid import GridTransport

    class Recorder(RoundProgress):
        def __init__(self) -> None:
            super().__init__(io.StringIO(), bar=False)
            self.events: list[tuple[str, object]] = []

        def begin(self, label: str, total: int, what: str = "clients reported") -> None:
            self.events.append(("begin", (label, total)))

        def update(self, done: int) -> None:
            if not self.events or self.events[-1] != ("update", done):
                self.events.append(("update", done))

        def end(self) -> None:
            self.events.append(("end", None))

    class TrickleGrid:
        """Answers one message per pull."""

        def push_messages(self, messages: list) -> list[str]:
            self.ids = [f"m-{i}" for i in range(len(messages))]
            return list(self.ids)

        def pull_messages(self, ids: set) -> list:
            if not self.ids:
                return []
            mid = self.ids.pop(0)
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid))]

    recorder = Recorder()
    transport = GridTransport(TrickleGrid(), threading.Event(), progress=recorder)  # type: ignore[arg-type]
    replies = transport.send_and_receive([object(), object(), object()], timeout=60, label="round 7")  # type: ignore[list-item]
    assert len(replies) == 3
    assert recorder.events == [("begin", ("round 7", 3)), ("update", 1), ("update", 2), ("update", 3), ("end", None)]


def test_the_progress_names_the_round_as_the_rounds_line_does() -> None:
    from fedlora.flower.grid import GridTransport

    assert GridTransport(object(), num_rounds=10).round_label(3) == "round 3/10"  # type: ignore[arg-type]
    assert GridTransport(object()).round_label(3) == "round 3"  # type: ignore[arg-type]
