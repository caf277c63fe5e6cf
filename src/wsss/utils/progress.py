"""Progress bars for the commands' long loops, shown only where someone watches (stderr is a terminal)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable


def tty_progress(desc: str, **kw) -> Callable[[Iterable], Iterable] | None:
    """A wrapper that shows a tqdm bar named ``desc`` over an iterable when stderr is a terminal, else None
    (logs and pipes stay free of bar redraws). ``kw`` goes to tqdm (e.g. ``leave=False``)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, dynamic_ncols=True, **kw)
