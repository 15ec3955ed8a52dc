"""Progress bars for long work (tqdm), quiet enough for executed notebooks.

Plain tqdm, not tqdm.auto: without ipywidgets the two are the same bar, and tqdm.auto adds a warning.
A bar redraws at most every ``mininterval`` seconds (10 by default) so that an executed chapter stores a
few lines of progress, not thousands; the rendered book hides them (``nb_output_stderr: remove``).
"""
from __future__ import annotations

from tqdm import tqdm


def bar(*args, **kwargs) -> tqdm:
    """A tqdm progress bar that redraws at most every 10 s unless ``mininterval`` says otherwise."""
    kwargs.setdefault("mininterval", 10.0)
    return tqdm(*args, **kwargs)
