"""The write loops' progress bar, started at the first finished item."""

from __future__ import annotations

from typing import Any


class LateProgress:
    """A tqdm bar (when ``show``) that starts at the first :meth:`step`, not before: the
    write loops step only once their worker processes have started, and tqdm starts a
    monitor thread that a fork must not inherit."""

    def __init__(self, *, total: int | None, unit: str, show: bool) -> None:
        self.total, self.unit, self.show = total, unit, show
        self.bar: Any = None

    def step(self, done: int) -> None:
        """One more item finished; ``done``: items finished before it (a resumed run's start)."""
        if self.bar is None:
            if not self.show:
                return
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=done, unit=self.unit, smoothing=0.1, dynamic_ncols=True)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
