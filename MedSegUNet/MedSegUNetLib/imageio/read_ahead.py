"""An iterator of byte pieces run ahead in a thread, a bounded number of bytes ahead of its reader.

Reading a CT's ``.nii.gz`` is two jobs of about equal size on one core each: inflating the stream
(ISA-L, which releases the GIL) and putting the pieces in place (allocating the image, whose fresh pages
the kernel must supply, and copying). Run one after the other they take their sum; with the inflate
a thread ahead, about the larger of the two. The standard library's ``queue.Queue`` bounds items, not
bytes: an item here is 1 to 8 MB, so the bound is kept in bytes, as the memory it holds.
"""

from __future__ import annotations

import collections
import threading
from types import TracebackType
from typing import Deque, Iterator, Optional, Type


class ReadAhead:
    """Iterate ``pieces`` in a daemon thread, at most about ``limit`` bytes ahead of the consumer.

    The consumer iterates this object (the source's exceptions are raised there, in order) and must
    call :meth:`close` (or use ``with``) before it touches anything the source uses: close stops the
    thread and waits for it."""

    def __init__(self, pieces: Iterator[bytes], limit: int):
        self._pieces, self._limit = pieces, limit
        self._queue: Deque[bytes] = collections.deque()
        self._held = 0
        self._finished, self._stopped = False, False
        self._error: Optional[BaseException] = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._produce, name="medsegunet-read-ahead", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for piece in self._pieces:
                with self._changed:
                    while self._queue and self._held >= self._limit and not self._stopped:  # one piece always fits
                        self._changed.wait()
                    if self._stopped:
                        return
                    self._queue.append(piece)
                    self._held += len(piece)
                    self._changed.notify_all()
        except BaseException as error:  # handed to the consumer, raised where it reads
            self._error = error
        finally:
            with self._changed:
                self._finished = True
                self._changed.notify_all()

    def __iter__(self) -> Iterator[bytes]:
        while True:
            with self._changed:
                while not self._queue and not self._finished:
                    self._changed.wait()
                if not self._queue:
                    if self._error is not None:
                        raise self._error
                    return
                piece = self._queue.popleft()
                self._held -= len(piece)
                self._changed.notify_all()
            yield piece

    def close(self) -> None:
        with self._changed:
            self._stopped = True
            self._queue.clear()
            self._held = 0
            self._changed.notify_all()
        self._thread.join()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()
