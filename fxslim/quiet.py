"""Third-party chatter held back. onnxruntime's calibrator prints progress lines ("Collecting tensor data and
making histogram ...", the histogram sizes, the percentile) on every static INT8 export, which buries a
benchmark's table or a CLI's report. `quiet()` swallows what is written to `sys.stdout` / `sys.stderr` inside
it, unless `FXSLIM_DEBUG=1` lets it through. It wraps one third-party call and must never hide fxslim's own
output. The chatter is Python-level `print` (onnxruntime 1.32: nothing reaches file descriptors 1 and 2), so
the descriptors are left alone and C-level logging still shows.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

from fxslim.pass_api import debug_enabled


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Discard Python-level stdout and stderr for the duration; pass them through when FXSLIM_DEBUG is set."""
    if debug_enabled():
        yield
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield
