"""Reading input volumes and writing segmentations, with one clear error per bad file.

Reading goes through SimpleITK (NRRD, NIfTI, MetaImage, DICOM series); ``.seg.nrrd`` output is written
with the header slicerio writes (segmentation_nrrd.py) so that Slicer sees segment names, colors, label values and
terminology exactly as if it had saved the file itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from MedSegUNetLib.core.atomic import atomic_path
from MedSegUNetLib.core.errors import MedSegError, PathLike
from MedSegUNetLib.core.geometry import Grid
from MedSegUNetLib.core.labels import Label
from MedSegUNetLib.core.memory import available_memory_bytes, describe_bytes
from MedSegUNetLib.core.writable_image import writable_voxels
from MedSegUNetLib.imageio import nifti_voxels, nrrd_voxels
from MedSegUNetLib.imageio.gzip_stream import CorruptStream
from MedSegUNetLib.imageio.nifti_voxels import holds_voxels, read_voxels
from MedSegUNetLib.imageio.segmentation_nrrd import labelmap_pixel_type, write_segmentation_nrrd

IMAGE_ENDINGS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
LABELMAP_ENDINGS = (".nrrd", ".nii", ".nii.gz", ".mha")
SEGMENTATION_ENDING = ".seg.nrrd"
# Refuse headers that claim more voxels than this before allocating anything (2048^3 float32 = 32 GB).
MAX_VOXELS = 2048**3
# Slices of a DICOM series further apart than this fraction of the usual step mean a missing slice.
SLICE_GAP_TOLERANCE = 0.1
_INTEGER_TYPES = {
    sitk.sitkUInt8,
    sitk.sitkInt8,
    sitk.sitkUInt16,
    sitk.sitkInt16,
    sitk.sitkUInt32,
    sitk.sitkInt32,
    sitk.sitkUInt64,
    sitk.sitkInt64,
}
_BYTES_PER_COMPONENT = {
    sitk.sitkUInt8: 1,
    sitk.sitkInt8: 1,
    sitk.sitkUInt16: 2,
    sitk.sitkInt16: 2,
    sitk.sitkUInt32: 4,
    sitk.sitkInt32: 4,
    sitk.sitkFloat32: 4,
    sitk.sitkUInt64: 8,
    sitk.sitkInt64: 8,
    sitk.sitkFloat64: 8,
}


@dataclass
class LoadedImage:
    """A 3D scalar image (integer as stored, else float32) and what was noticed while reading it."""

    image: sitk.Image
    path: Path
    warnings: List[str] = field(default_factory=list)


def has_ending(path: Path, endings: Sequence[str]) -> bool:
    name = path.name.lower()
    return any(name.endswith(ending) for ending in endings)


_QUIET_LOCK = threading.RLock()  # file descriptors are process-wide: one silencer at a time, reentrant
_quiet_depth = 0  # a silencer inside another one (same thread) leaves the redirection to the outer one


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Silence what ITK, GDCM, nifticlib and MetaIO print on the process's own stdout/stderr
    ("** ERROR: nifti_convert_nhdr2nim", "Non uniform sampling ..."): a bad file must give one clear
    line, and stdout carries the JSON progress. The problem is reported by the exception instead.

    SIGINT/SIGTERM are held meanwhile (their Python handler would only run once the native read
    returns anyway), so that a cancel can never strike between redirecting and restoring and leave
    the process without its stderr; a stop asked for meanwhile is delivered right after."""
    global _quiet_depth
    with _QUIET_LOCK:
        if _quiet_depth:
            yield
            return
        hold = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if hold else None
        saved, null = [], None
        try:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            try:
                for fd in (1, 2):
                    saved.append((fd, os.dup(fd)))
                null = os.open(os.devnull, os.O_WRONLY)
                for fd, _ in saved:
                    os.dup2(null, fd)
            except OSError:  # no console at all (a GUI process): nothing to silence
                pass
            _quiet_depth = 1
            yield
        finally:
            # Nested, so that a cancel raised between two steps (a thread other than this one may still
            # take the signal) cannot skip restoring stderr, where its own message is about to go.
            _quiet_depth = 0
            try:
                if saved:
                    os.dup2(saved[0][1], saved[0][0])
            finally:
                try:
                    if len(saved) > 1:
                        os.dup2(saved[1][1], saved[1][0])
                finally:
                    for _, copy in saved:
                        os.close(copy)
                    if null is not None:
                        os.close(null)
                    if previous is not None:  # the signals were held
                        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _memory_needed(voxels: int, pixel_id: int, components: int = 1) -> int:
    """Reading holds the voxels in their own type, then (floating-point files) as float32, plus a working
    copy: an upper bound for integer files, which stay as they are."""
    return voxels * (_BYTES_PER_COMPONENT.get(pixel_id, 8) * components + 8)


def _check_memory(size: Sequence[int], needed: int, path: Path) -> None:
    available = available_memory_bytes()
    if available is not None and needed > 0.9 * available:
        raise MedSegError(
            f"claims {'x'.join(map(str, size))} voxels: reading it needs about {describe_bytes(needed)} of memory, "
            f"{describe_bytes(available)} are available",
            path,
        )


def _check_information(reader: sitk.ImageFileReader, path: Path, max_voxels: int) -> None:
    """Look at the header only: dimension, pixel type, components and size, before reading any voxel."""
    dimension = reader.GetDimension()
    size = reader.GetSize()
    components = reader.GetNumberOfComponents()
    pixel_id = reader.GetPixelID()
    if pixel_id == sitk.sitkUnknown:
        raise MedSegError("has an unknown or unsupported pixel type", path)
    if "complex" in sitk.GetPixelIDValueAsString(pixel_id):
        raise MedSegError("holds complex-valued voxels; a real-valued scalar volume is needed", path)
    if dimension == 2 or (dimension == 3 and size[2] == 1):
        raise MedSegError(f"is a 2D image ({'x'.join(map(str, size[:2]))}); a 3D volume is needed", path)
    if dimension == 4:
        raise MedSegError(
            f"is a 4D image ({'x'.join(map(str, size))}); give one 3D volume per model input channel", path
        )
    if dimension != 3:
        raise MedSegError(f"is a {dimension}D image; a 3D volume is needed", path)
    if components != 1:
        raise MedSegError(f"has {components} components per voxel (color or vector); a scalar volume is needed", path)
    if any(s <= 0 for s in size):
        raise MedSegError(f"claims an empty size ({'x'.join(map(str, size))})", path)
    voxels = int(np.prod([int(s) for s in size], dtype=object))  # no overflow, whatever the header says
    if voxels > max_voxels:
        raise MedSegError(f"claims {'x'.join(map(str, size))} voxels, more than this tool will allocate", path)
    _check_memory(size, _memory_needed(voxels, pixel_id, components), path)


def _read_file(path: Path, max_voxels: int) -> sitk.Image:
    reader = _read_information(path, max_voxels)
    fast = _read_nifti_gz(path, reader)
    if fast is not None:
        return fast
    try:
        with _quiet_native_output():
            return reader.Execute()
    except RuntimeError as error:
        text = str(error).lower()
        if "allocate" in text:
            raise MedSegError("is too large for the memory available to read it", path) from None
        reason = "truncated or corrupt" if "read" in text else "unreadable"
        raise MedSegError(f"image data is {reason}", path) from None


def _read_information(path: Path, max_voxels: int) -> sitk.ImageFileReader:
    """ITK's reader of ``path`` with the header read and checked (:func:`_check_information`), no voxel read."""
    if not has_ending(path, IMAGE_ENDINGS):
        raise MedSegError(f"unsupported file type; use one of {', '.join(IMAGE_ENDINGS)} or a DICOM folder", path)
    if path.stat().st_size == 0:
        raise MedSegError("is empty", path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _quiet_native_output():
            reader.ReadImageInformation()
    except RuntimeError as error:
        if "Unknown PixelType" in str(error):
            raise MedSegError("has an unknown or unsupported pixel type", path) from None
        raise MedSegError("is not a readable image (bad or unrecognised header)", path) from None
    _check_information(reader, path, max_voxels)
    return reader


def read_grid(path: PathLike, max_voxels: int = MAX_VOXELS) -> Grid:
    """The voxel grid of an image file from its header alone (no voxel is read)."""
    reader = _read_information(Path(path), max_voxels)
    return Grid(
        (int(reader.GetSize()[0]), int(reader.GetSize()[1]), int(reader.GetSize()[2])),
        (float(reader.GetSpacing()[0]), float(reader.GetSpacing()[1]), float(reader.GetSpacing()[2])),
        (float(reader.GetOrigin()[0]), float(reader.GetOrigin()[1]), float(reader.GetOrigin()[2])),
        tuple(float(d) for d in reader.GetDirection()),
    )


def stream_image_slices(
    path: PathLike, start: Callable[[Grid], Callable[[np.ndarray], None]], max_voxels: int = MAX_VOXELS
) -> Optional[Grid]:
    """Hand an image's (y, x) slices, k = 0, 1, ..., to the consumer ``start(grid)`` returns, while the
    file is read, without ever holding the volume: for a plain integer ``.nii.gz`` (nifti_voxels.read_slices),
    the usual CT, and a plain integer ``.nrrd`` (nrrd_voxels.read_slices), what the Slicer panel hands
    the engine. The header is checked as :func:`read_image` checks it, with the same errors.

    Returns the image's grid; None where this path does not apply (another format, floating-point voxels
    whose NaN need the whole volume, a file these readers leave to ITK): the consumer's slices, if any,
    are then to be discarded and the image read with :func:`read_image`. A cut-short or corrupt stream
    raises the error :func:`read_image` raises for it."""
    path = Path(path)
    read_slices = next((reader for ending, reader in _SLICE_READERS.items() if has_ending(path, (ending,))), None)
    if read_slices is None or not path.is_file():
        return None
    reader = _read_information(path, max_voxels)
    if reader.GetPixelID() not in _INTEGER_TYPES:
        return None
    grid = Grid(
        tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection())
    )
    consume = start(grid)
    with _corrupt_stream_reported(path):
        return grid if read_slices(path, reader.GetSize(), _numpy_type(reader.GetPixelID()), consume) else None


_SLICE_READERS = {".nii.gz": nifti_voxels.read_slices, ".nrrd": nrrd_voxels.read_slices}


@contextlib.contextmanager
def _corrupt_stream_reported(path: Path) -> Iterator[None]:
    try:
        yield
    except CorruptStream:
        raise MedSegError("image data is truncated or corrupt", path) from None


def _numpy_type(pixel_id: int) -> np.dtype:
    return sitk.GetArrayViewFromImage(sitk.Image(1, 1, 1, pixel_id)).dtype


def _read_nifti_gz(path: Path, reader: sitk.ImageFileReader) -> Optional[sitk.Image]:
    """A plain ``.nii.gz`` with its voxels inflated by ISA-L straight into the image (nifti_voxels.py) and its
    geometry as ITK read it from the header; None where that reader does not apply (ITK then reads)."""
    if not has_ending(path, (".nii.gz",)):
        return None
    expected = _numpy_type(reader.GetPixelID())
    made: List[sitk.Image] = []  # allocated only once the header is known to be the plain case

    def allocate() -> np.ndarray:
        made.append(sitk.Image(list(reader.GetSize()), reader.GetPixelID()))
        # filled in place: letting GetImageFromArray copy a filled array would cost a second pass over fresh memory
        return writable_voxels(made[0]).reshape(-1).view(np.uint8)

    with _corrupt_stream_reported(path):
        if not read_voxels(path, reader.GetSize(), expected, allocate):
            return None
    image = made[0]
    image.SetSpacing(reader.GetSpacing())
    image.SetOrigin(reader.GetOrigin())
    image.SetDirection(reader.GetDirection())
    return image


def dicom_series(folder: Path) -> List[str]:
    """The DICOM series IDs in ``folder`` (not its subfolders); ITK's warning for none is silenced."""
    with _quiet_native_output():
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])


def _read_dicom_folder(folder: Path, series: Optional[str], max_voxels: int) -> sitk.Image:
    series_ids = dicom_series(folder)
    if not series_ids:
        raise MedSegError("holds no DICOM series", folder)
    if series is None and len(series_ids) > 1:
        listed = "; ".join(series_ids[:5])
        raise MedSegError(f"holds {len(series_ids)} DICOM series, pick one with --series: {listed}", folder)
    if series is not None and series not in series_ids:
        raise MedSegError(f"has no DICOM series '{series}' (it has: {'; '.join(series_ids[:5])})", folder)
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series or series_ids[0])
    if len(files) < 2:
        raise MedSegError("the DICOM series has a single slice; a 3D volume is needed", folder)
    first = _check_dicom_slices(files, folder)
    size = (*first.GetSize()[:2], len(files))
    voxels = int(np.prod(size, dtype=object))
    if voxels > max_voxels:
        raise MedSegError("the DICOM series is larger than this tool will allocate", folder)
    _check_memory(size, _memory_needed(voxels, first.GetPixelID(), first.GetNumberOfComponents()), folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with _quiet_native_output():
            image = reader.Execute()
    except RuntimeError:
        raise MedSegError("the DICOM series cannot be read (corrupt or unsupported files)", folder) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MedSegError("the DICOM series is not a scalar (grayscale) volume", folder)
    return image


def _check_dicom_slices(files: Sequence[str], folder: Path) -> sitk.ImageFileReader:
    """Read every slice's header: a missing or duplicated slice (uneven ImagePositionPatient steps along
    the slice normal) is refused, where ITK would stack the slices and stretch the spacing silently.
    Returns the first slice's reader (size, pixel type)."""
    positions, normal, first = [], None, None
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            with _quiet_native_output():
                reader.ReadImageInformation()
        except RuntimeError:
            raise MedSegError(f"the DICOM file {Path(name).name} cannot be read", folder) from None
        if first is None:
            first = reader
        if not (reader.HasMetaDataKey("0020|0032") and reader.HasMetaDataKey("0020|0037")):
            return first  # no positions to check (GDCM sorted the slices by other means)
        try:
            position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
            if normal is None:
                row_col = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
                normal = np.cross(row_col[:3], row_col[3:6])
        except ValueError:
            return first
        if len(position) != 3:
            return first
        positions.append(float(np.dot(position, normal)))
    steps = np.diff(np.sort(positions))
    usual = float(np.median(steps))
    if usual <= 1e-3 or np.any(steps <= 1e-3):
        raise MedSegError(
            "the DICOM series has two slices at the same position (a duplicated or mixed series?)", folder
        )
    odd = np.flatnonzero(np.abs(steps - usual) > SLICE_GAP_TOLERANCE * usual)
    if odd.size:
        index = int(odd[0])
        raise MedSegError(
            f"the DICOM series is not evenly spaced: {steps[index]:g} mm between slices {index + 1} and {index + 2} "
            f"where the others are {usual:g} mm apart (a missing slice?)",
            folder,
        )
    assert first is not None  # files is never empty: the caller refuses a series of fewer than 2 slices
    return first


def _replace_non_finite(image: sitk.Image, path: Path) -> Tuple[sitk.Image, List[str]]:
    """NaN/Inf would poison the whole window they fall in: replace them, or refuse an all-NaN volume."""
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    if finite.all():
        return image, []
    if not finite.any():
        raise MedSegError("holds no finite voxel values (all NaN or Inf)", path)
    writable = sitk.GetArrayFromImage(image)
    low = float(writable[finite].min())
    bad = int(np.count_nonzero(~finite))
    writable[~finite] = low
    fixed = sitk.GetImageFromArray(writable)
    fixed.CopyInformation(image)
    return fixed, [f"{path.name}: {bad} NaN/Inf voxels replaced by the minimum value {low:g}"]


def read_image(path: PathLike, series: Optional[str] = None, max_voxels: int = MAX_VOXELS) -> LoadedImage:
    """Read a 3D scalar volume (file or DICOM folder), or raise :class:`MedSegError`.

    Integer voxels stay as stored (a CT's int16 is half the memory of float32, and casting a full
    volume costs time that resampling to the network grid, which outputs float32, does anyway);
    floating-point voxels come as float32 with NaN/Inf replaced."""
    path = Path(path)
    if not path.exists():
        raise MedSegError("input not found", path)
    if path.is_dir():
        image = _read_dicom_folder(path, series, max_voxels)
    else:
        image = _read_file(path, max_voxels)
    if image.GetPixelID() in _INTEGER_TYPES:
        return LoadedImage(image, path, [])  # no NaN to replace; the network grid comes out as float32
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    image, warnings = _replace_non_finite(image, path)
    return LoadedImage(image, path, warnings)


def read_labelmap(path: PathLike, max_voxels: int = MAX_VOXELS) -> sitk.Image:
    """A 3D labelmap file (integer values; a float file only if every value is a whole number)."""
    path = Path(path)
    if not path.is_file():
        raise MedSegError("labelmap not found", path)
    image = _read_file(path, max_voxels)
    values = sitk.GetArrayViewFromImage(image)
    if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        raise MedSegError("is not a labelmap (it holds fractional values)", path)
    if values.min() < 0 or values.max() > 65535:
        raise MedSegError(f"is not a labelmap (values {values.min():g}..{values.max():g})", path)
    return sitk.Cast(image, sitk.sitkUInt16)


# --- writing ---------------------------------------------------------------------------------------


def _as_pixel_type(image: sitk.Image, pixel_type: int) -> sitk.Image:
    return image if image.GetPixelID() == pixel_type else sitk.Cast(image, pixel_type)


def write_segmentation(path: PathLike, label_image: sitk.Image, labels: Sequence[Label]) -> Path:
    """Write ``label_image`` (label values of ``labels``) as ``.seg.nrrd`` (segmentation_nrrd.py) or as a
    plain labelmap."""
    path = Path(path)
    check_output_type(path)
    image = _as_pixel_type(label_image, labelmap_pixel_type(labels))
    if has_ending(path, (SEGMENTATION_ENDING,)):
        return write_segmentation_nrrd(path, image, labels)
    with atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=True)
        _verify_written(temporary, image, path)
    return path


def _verify_written(temporary: Path, image: sitk.Image, path: Path) -> None:
    """ITK's writers can report success after a failed write (a full disk truncates a .nii.gz silently):
    check the file before it may replace anything. A .nii.gz is inflated once (its CRC and length
    checked) and must hold exactly the voxels written; other files are read back with ITK."""
    try:
        if temporary.name.endswith(".nii.gz"):
            same = _nifti_gz_holds(temporary, image)
        else:
            written = sitk.ReadImage(str(temporary))
            same = Grid.of(written).matches(Grid.of(image)) and np.array_equal(
                sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(image)
            )
    except (OSError, RuntimeError):  # unreadable, or ITK refusing what it reads back
        same = False
    if not same:
        raise MedSegError(
            "writing the output failed (disk full or quota reached?); the previous file is unchanged", path
        )


def _nifti_gz_holds(path: Path, image: sitk.Image) -> bool:
    """True when the ``.nii.gz`` at ``path`` holds exactly ``image``'s voxels behind a plain header of its
    size and type (nifti_voxels.holds_voxels: the streamed inflate that reads inputs, compared piece by piece)."""
    return holds_voxels(path, sitk.GetArrayViewFromImage(image))


def check_output_type(path: Path) -> None:
    if not (has_ending(path, (SEGMENTATION_ENDING,)) or has_ending(path, LABELMAP_ENDINGS)):
        raise MedSegError(
            f"unsupported output type; use {SEGMENTATION_ENDING} or a labelmap ({', '.join(LABELMAP_ENDINGS)})", path
        )
