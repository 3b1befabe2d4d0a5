"""Writing into a SimpleITK image's own voxel buffer.

SimpleITK hands out read-only views of an image's voxels; the ways to fill an image from numpy
(``GetImageFromArray``, ``Paste``) each allocate and copy a whole new image: a pass over fresh memory,
which the kernel must supply page by page. The pipeline instead makes an image once and writes into it
through this view.
"""

from __future__ import annotations

import ctypes

import numpy as np
import SimpleITK as sitk


def writable_voxels(image: sitk.Image) -> np.ndarray:
    """A writable (z, y, x) array over the voxels of ``image``, valid while ``image`` lives.

    Only for an image this code has just made (``sitk.Image(...)``) and not yet handed on or copied:
    SimpleITK may share the buffer of copied images, and writing here would bypass its copy-on-write."""
    view = sitk.GetArrayViewFromImage(image)
    buffer = (ctypes.c_char * view.nbytes).from_address(view.__array_interface__["data"][0])
    # ctypes arrays have the buffer protocol; numpy's stubs for Python < 3.12 list only bytes-like types
    return np.frombuffer(buffer, view.dtype).reshape(view.shape)  # type: ignore[call-overload]
