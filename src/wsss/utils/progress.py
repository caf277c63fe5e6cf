"""Progress of the commands' long loops: a tqdm bar where someone watches (stderr is a terminal), else a log
line now and then, so a run under nohup, a scheduler or a pipe still says how far it is without bar redraws."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger("wsss")

LOG_EVERY_S = 30.0  # off a terminal: a loop shorter than this logs nothing


def progress_reporter(desc: str, *, interval: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic,
                      **kw) -> Callable[[Iterable], Iterable]:  # fmt: skip
    """A wrapper over an iterable named ``desc``: on a terminal a tqdm bar (``kw`` goes to tqdm, e.g.
    ``leave=False``); elsewhere it logs ``desc: N/M (P %), T s`` once every ``interval`` seconds of the
    ``clock`` (``/M (P %)`` only when the iterable has a length) and, if it logged any, ``desc: N done in T s``
    at the end."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return lambda it: tqdm(it, desc=desc, dynamic_ncols=True, **kw)
    return lambda it: _logged(it, desc, interval, clock)


def _logged(it: Iterable, desc: str, interval: float, clock: Callable[[], float]) -> Iterator:
    total = len(it) if hasattr(it, "__len__") else None  # type: ignore[arg-type]
    start = clock()
    next_at, logged, n = start + interval, False, 0
    for n, x in enumerate(it, 1):
        yield x
        now = clock()
        if now >= next_at:
            of = f"/{total} ({100 * n // total} %)" if total else ""
            log.info("%s: %d%s, %.0f s", desc, n, of, now - start)
            next_at, logged = now + interval, True
    if logged:
        log.info("%s: %d done in %.0f s", desc, n, clock() - start)
