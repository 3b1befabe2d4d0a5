"""What the segment engine keeps MONAI from importing.

``import monai`` imports every MONAI submodule, and with them matplotlib.pyplot (monai.visualize,
monai.utils.jupyter_utils) and scipy.signal (monai.data.ultrasound_confidence_map): a third of the
engine's import time and tens of MB of its resident memory (benchmarks/README.md), for functions
``segment`` never calls. MONAI asks for both through ``optional_import``, which treats a module
that cannot be imported as absent and fails only when something of it is used. ``segment`` and
``standby`` therefore mark them as unimportable before MONAI is imported; training, evaluation and the
demo (which plot) import them as usual. The segment tests run every path of the engine this way.
"""

from __future__ import annotations

import sys

SKIPPED = ("matplotlib", "scipy.signal")


def skip_unused_imports() -> None:
    """Make ``import matplotlib`` and ``import scipy.signal`` fail in this process (unless already imported)."""
    for name in SKIPPED:
        if name not in sys.modules:
            # the import system raises ImportError for a None entry (documented); typeshed allows modules only
            sys.modules[name] = None  # type: ignore[assignment]
