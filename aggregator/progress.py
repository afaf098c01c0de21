"""A federation's progress on the terminal, drawn from the run's own events (:func:`~fedbus.aggregator.
federation.watch`): a progress bar over rounds and one line per round with clients in/late/dropped, loss,
accuracy and ε. The view is an ordinary subscriber, so it works the same for a simulation and for a
deployed aggregator on another machine."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedbus.bus.events import Event, Params

from .events import RoundClose, RunFinished

__all__ = ["ProgressView", "metrics_table"]


def _fmt(value: object, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, int | float) and not isinstance(value, bool) else "-"


@dataclass
class ProgressView:
    """``with ProgressView(console, rounds) as view: ... on_event=view``."""

    console: Console
    rounds: int
    title: str = "federation"
    history: list[Params] = field(default_factory=list)
    finished: RunFinished | None = None

    def __post_init__(self) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._task = self._progress.add_task(self.title, total=self.rounds)

    def __call__(self, event: Event) -> None:
        match event:
            case RoundClose(kind="summary", round=rnd, metrics=m):
                self.history.append(m)
                self._progress.update(self._task, completed=rnd)
                self._progress.console.print(self.line(rnd, m))
            case RoundClose(kind="fit", status="ok", round=rnd, metrics=m) if (
                m.get("mean_staleness") is not None
            ):
                self.history.append(m)  # asynchronous mode: no evaluation summary
                self._progress.update(self._task, completed=rnd)
                self._progress.console.print(self.line(rnd, m))
            case RoundClose(kind="fit", status="failed", round=rnd, late=late, dropped=dropped):
                self._progress.console.print(
                    f"  round {rnd:>3}  [yellow]failed[/]: too few updates "
                    f"(late {len(late)}, dropped {len(dropped)}); retrying"
                )
            case RunFinished() as done:
                self.finished = done
            case _:
                pass

    @staticmethod
    def line(rnd: int, m: Params) -> str:
        """One round's line."""
        acc = m.get("test_accuracy", m.get("eval_accuracy"))
        loss = m.get("test_loss", m.get("eval_loss", m.get("loss")))
        parts = [
            f"  round {rnd:>3}",
            f"clients {_fmt(m.get('clients'), 'd')}",
            f"late {_fmt(m.get('late', 0), 'd')}",
            f"dropped {_fmt(m.get('dropped', 0), 'd')}",
            f"loss {_fmt(loss)}",
            f"accuracy {_fmt(acc)}",
        ]
        if "epsilon" in m:
            parts.append(f"ε {_fmt(m['epsilon'], '.3f')}")
        if "mean_staleness" in m:
            parts.append(f"staleness {_fmt(m['mean_staleness'], '.2f')}")
        return "  ".join(parts)

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()


def metrics_table(metrics: Params, *, title: str = "final metrics") -> Table:
    """A two-column table of a run's final metrics."""
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in metrics.items():
        table.add_row(key, _fmt(value) if isinstance(value, float) else str(value))
    return table
