"""Synthetic DICOM CT series and RT structure sets, written with pydicom, for the tests.

The geometry is DICOM's own: slice ``k``'s ImagePositionPatient is ``origin + k * step * normal`` and
pixel (row j, column i) sits at ``position + i * dx * row_direction + j * dy * column_direction``.
``physical`` turns (i, j, k) indices into patient coordinates with exactly these rules, independently
of the engine's geometry, so that a contour drawn in index units lands where the test says it does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


@dataclass
class SeriesGeometry:
    size: Tuple[int, int, int] = (40, 32, 12)  # columns (i), rows (j), slices (k)
    spacing: Tuple[float, float, float] = (0.8, 0.7, 2.5)  # dx, dy, slice step
    origin: Tuple[float, float, float] = (-20.0, -15.0, 30.0)
    row_direction: Tuple[float, float, float] = (1.0, 0.0, 0.0)
    column_direction: Tuple[float, float, float] = (0.0, 1.0, 0.0)
    slice_sign: float = 1.0  # -1: slices stored towards the feet (a flipped series)

    def normal(self) -> np.ndarray:
        return self.slice_sign * np.cross(self.row_direction, self.column_direction)

    def physical(self, ijk: np.ndarray) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=float)
        return (
            np.array(self.origin)
            + ijk[:, :1] * self.spacing[0] * np.array(self.row_direction)
            + ijk[:, 1:2] * self.spacing[1] * np.array(self.column_direction)
            + ijk[:, 2:3] * self.spacing[2] * self.normal()
        )


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _common(dataset: Dataset, study: str, series: str, frame: str, modality: str) -> None:
    dataset.PatientName, dataset.PatientID = "Test^Phantom", "TEST"
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.FrameOfReferenceUID = study, series, frame
    dataset.Modality = modality
    dataset.StudyDate, dataset.StudyTime = "20260101", "120000"


def write_ct_series(folder: Path, geometry: SeriesGeometry, study: str = "", frame: str = "") -> Tuple[str, str, str]:
    """One file per slice; voxel (i, j, k) holds ``i + 10 j + 100 k`` HU. Returns (study, series, frame) UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = study or generate_uid(), generate_uid(), frame or generate_uid()
    columns, rows, slices = geometry.size
    for k in range(slices):
        sop = generate_uid()
        dataset = Dataset()
        dataset.file_meta = _file_meta(CTImageStorage, sop)
        _common(dataset, study, series, frame, "CT")
        dataset.SOPClassUID, dataset.SOPInstanceUID = CTImageStorage, sop
        dataset.InstanceNumber = k + 1
        dataset.ImagePositionPatient = [f"{v:.6f}" for v in geometry.physical(np.array([[0, 0, k]]))[0]]
        dataset.ImageOrientationPatient = [f"{v:.8f}" for v in (*geometry.row_direction, *geometry.column_direction)]
        dataset.PixelSpacing = [f"{geometry.spacing[1]:g}", f"{geometry.spacing[0]:g}"]  # row step, column step
        dataset.SliceThickness = f"{geometry.spacing[2]:g}"
        dataset.Rows, dataset.Columns = rows, columns
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
        dataset.RescaleIntercept, dataset.RescaleSlope = "0", "1"
        j, i = np.mgrid[0:rows, 0:columns]
        dataset.PixelData = (i + 10 * j + 100 * k).astype(np.int16).tobytes()
        dataset.save_as(str(folder / f"CT_{k:04d}.dcm"), enforce_file_format=True)
    return study, series, frame


def write_rtstruct(
    path: Path,
    uids: Tuple[str, str, str],
    rois: Dict[str, List[np.ndarray]],
    colors: Sequence[Tuple[int, int, int]] = (),
    geometric_type: str = "CLOSED_PLANAR",
) -> Path:
    """An RTSTRUCT referencing series ``uids[1]``; ``rois`` maps a name to polygons in patient coordinates."""
    study, series, frame = uids
    sop = generate_uid()
    dataset = Dataset()
    dataset.file_meta = _file_meta(RTSTRUCT_CLASS, sop)
    _common(dataset, study, generate_uid(), frame, "RTSTRUCT")
    dataset.SOPClassUID, dataset.SOPInstanceUID = RTSTRUCT_CLASS, sop
    dataset.StructureSetLabel = "test"
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series
    referenced_study = Dataset()
    referenced_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    referenced_study.ReferencedSOPInstanceUID = study
    referenced_study.RTReferencedSeriesSequence = DicomSequence([referenced_series])
    referenced_frame = Dataset()
    referenced_frame.FrameOfReferenceUID = frame
    referenced_frame.RTReferencedStudySequence = DicomSequence([referenced_study])
    dataset.ReferencedFrameOfReferenceSequence = DicomSequence([referenced_frame])
    names, contours = [], []
    for number, (name, polygons) in enumerate(rois.items(), start=1):
        entry = Dataset()
        entry.ROINumber, entry.ROIName, entry.ReferencedFrameOfReferenceUID = number, name, frame
        entry.ROIGenerationAlgorithm = "MANUAL"
        names.append(entry)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = list(colors[number - 1]) if len(colors) >= number else [255, 0, 0]
        items = []
        for polygon in polygons:
            contour = Dataset()
            contour.ContourGeometricType = geometric_type
            contour.NumberOfContourPoints = len(polygon)
            contour.ContourData = [f"{v:.6f}" for v in np.asarray(polygon, dtype=float).ravel()]
            items.append(contour)
        roi_contour.ContourSequence = DicomSequence(items)
        contours.append(roi_contour)
    dataset.StructureSetROISequence = DicomSequence(names)
    dataset.ROIContourSequence = DicomSequence(contours)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(str(path), enforce_file_format=True)
    return path


def rectangle(geometry: SeriesGeometry, i: Tuple[float, float], j: Tuple[float, float], k: float) -> np.ndarray:
    """A rectangle with corners at index coordinates (i0..i1, j0..j1) on slice k, in patient coordinates."""
    corners = np.array([[i[0], j[0], k], [i[1], j[0], k], [i[1], j[1], k], [i[0], j[1], k]])
    return geometry.physical(corners)
