"""Python's own stdout and stderr kept apart from the native output that image reading silences.

Reading an image silences what ITK, GDCM and nifticlib print by pointing the process's descriptors 1
and 2 at /dev/null while it reads (images._quiet_native_output). With reading in a background thread
(``segment-batch``), whatever the main thread reports meanwhile (JSON progress, a case's error) would
vanish with it; written through copies of those descriptors, it does not.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional, TextIO


@contextlib.contextmanager
def python_streams_apart() -> Iterator[None]:
    """``sys.stdout`` and ``sys.stderr`` write through duplicates of descriptors 1 and 2 meanwhile
    (streams that are not those descriptors, e.g. a test's capture, are left as they are)."""
    saved = sys.stdout, sys.stderr
    copies = [_copy_of(stream, descriptor) for stream, descriptor in zip(saved, (1, 2))]
    sys.stdout, sys.stderr = (copy or stream for copy, stream in zip(copies, saved))
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        for copy in copies:
            if copy is not None:
                with contextlib.suppress(OSError, ValueError):
                    copy.close()


def _copy_of(stream: TextIO, descriptor: int) -> Optional[TextIO]:
    try:
        if stream.fileno() != descriptor:
            return None
        stream.flush()
    except (AttributeError, OSError, ValueError):  # no descriptor behind it (a capture)
        return None
    encoding = getattr(stream, "encoding", None) or "utf-8"
    return open(os.dup(descriptor), "w", encoding=encoding, errors="backslashreplace", buffering=1)
