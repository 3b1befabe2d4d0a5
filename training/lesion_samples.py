"""Real lung lesion cases from a package registry: the `pycerr` 2.5.1 wheel's radiomics phantom.

pycerr ships ``cerr/datasets/radiomics_phantom_dicom/``: four lung CT crops (pat_1..pat_4, DICOM) with a
DICOM RT structure set each, holding one gross tumour volume (GTV-1) drawn on the CT. We download the
wheel once (pip, checked hash, no install), take only that folder, and write each case as a Slicer
scene, as plain files and as its DICOM folder (CT + RTSTRUCT, readable by `train` and `evaluate`).

The data is licensed CC BY-NC 3.0 (non-commercial), not under this project's licence: it is never
shipped with MedSegUNet, and the licence and citation are written next to every copy.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from MedSegUNetLib.core.errors import MedSegError

from .registry import cache_folder, download_from_index

PACKAGE, VERSION = "pycerr", "2.5.1"
WHEEL = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "5c3e82cc387538c5c38143827314fc2aa743ef886e8518f7f52beff6805c635d"  # of the file on PyPI, checked
DATASET = "cerr/datasets/radiomics_phantom_dicom"
LICENSE_FILE = "README_LICENSE.txt"
PATIENTS = ("pat_1", "pat_2", "pat_3", "pat_4")
LESION_NOTE = (
    "Lung CT lesion cases (GTV contours in DICOM RT structure sets) from the pycerr 2.5.1 wheel "
    "(PyPI, cerr/datasets/radiomics_phantom_dicom): the Radiomics Digital Phantom, contributed by Philippe "
    "Lambin, CancerData (2016), DOI:10.17195/candat.2016.08.1; licensed CC BY-NC 3.0 "
    "(https://creativecommons.org/licenses/by-nc/3.0/), non-commercial use only. Cite: Lambin P et al., "
    "Radiomics: the bridge between medical imaging and personalized medicine, Nat Rev Clin Oncol 2017;14(12):749."
)


def lesion_sample_names() -> List[str]:
    return [f"lung-gtv-{patient.split('_')[1]}" for patient in PATIENTS]


def _wanted(name: str) -> bool:
    return name == f"{DATASET}/{LICENSE_FILE}" or any(name.startswith(f"{DATASET}/{p}/") for p in PATIENTS)


def extract_dataset(wheel: Path, target: Path) -> None:
    """Only the dataset's files; each member checked to stay inside ``target`` and to be a plain file."""
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if member.is_dir() or not _wanted(member.filename):
                continue
            relative = PurePosixPath(member.filename).relative_to(DATASET)
            if relative.is_absolute() or ".." in relative.parts or stat.S_ISLNK(member.external_attr >> 16):
                raise MedSegError(f"archive member is not a plain file inside the dataset: {member.filename}", wheel)
            destination = target.joinpath(*relative.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(destination, "wb") as sink:
                shutil.copyfileobj(source, sink)


def fetch_lesion_sources(cache: Optional[Path] = None, log: Callable[[str], None] = print) -> Path:
    """The extracted dataset folder (pat_1..pat_4 and its licence), downloading once into the cache."""
    cache = Path(cache or cache_folder())
    sources = cache / f"{PACKAGE}-{VERSION}-lesions"
    if (sources / ".complete").exists():
        return sources
    cache.mkdir(parents=True, exist_ok=True)
    log(f"downloading {PACKAGE}=={VERSION} (wheel, ~26 MB) from the package index, once")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as work:
        wheel = download_from_index(f"{PACKAGE}=={VERSION}", WHEEL, WHEEL_SHA256, Path(work), wheel=True)
        staging = Path(work) / "files"
        extract_dataset(wheel, staging)
        missing = [name for name in (LICENSE_FILE, *PATIENTS) if not (staging / name).exists()]
        if missing:
            raise MedSegError(f"the downloaded package lacks {DATASET}/{missing[0]}", wheel)
        (staging / ".complete").write_text(LESION_NOTE + "\n", encoding="utf-8")
        if sources.exists():
            shutil.rmtree(sources)  # an earlier, interrupted extraction
        os.replace(staging, sources)  # atomic: a cache folder is complete or absent
    return sources


@dataclass
class WrittenLesion:
    name: str
    dicom: Path  # the CT series and its RTSTRUCT
    image: Path  # .nrrd
    segmentation: Path  # .seg.nrrd with the ROIs by name
    scene: Path  # .mrb
    lesion_ml: float


def write_lesion_case(patient: Path, name: str, output: Path) -> WrittenLesion:
    from MedSegUNetLib.imageio.images import write_segmentation
    from MedSegUNetLib.imageio.rtstruct import read_structure_set

    from .scene_writer import ScenePair, write_mrb

    folder = output / name
    dicom = folder / "dicom"
    if dicom.exists():
        shutil.rmtree(dicom)
    shutil.copytree(patient, dicom)
    structures = read_structure_set(dicom)
    image_file = folder / "image.nrrd"
    sitk.WriteImage(sitk.Cast(structures.image, sitk.sitkInt16), str(image_file), useCompression=True)
    labelmap = np.zeros(structures.image.GetSize()[::-1], dtype=np.uint8)
    for label in structures.labels:
        labelmap[structures.masks[label.name]] = label.value  # the phantom's ROIs do not overlap (one GTV each)
    label_image = sitk.GetImageFromArray(labelmap)
    label_image.CopyInformation(structures.image)
    segmentation = write_segmentation(folder / "reference.seg.nrrd", label_image, structures.labels)
    scene = write_mrb(output / f"{name}.mrb", name, [ScenePair(name, image_file, segmentation, f"{name} reference")])
    voxel_ml = float(np.prod(structures.image.GetSpacing())) / 1000
    return WrittenLesion(name, dicom, image_file, segmentation, scene, float((labelmap > 0).sum()) * voxel_ml)


def write_lesion_samples(
    output: Path,
    names: Optional[Sequence[str]] = None,
    cache: Optional[Path] = None,
    log: Callable[[str], None] = print,
) -> List[WrittenLesion]:
    """The chosen lesion cases (default all four), with the dataset's licence beside them."""
    sources = fetch_lesion_sources(cache, log)
    output.mkdir(parents=True, exist_ok=True)
    written = [
        write_lesion_case(sources / patient, name, output)
        for patient, name in zip(PATIENTS, lesion_sample_names())
        if names is None or name in names
    ]
    shutil.copyfile(sources / LICENSE_FILE, output / "LESIONS_LICENSE.txt")
    (output / "LESIONS_SOURCE.txt").write_text(LESION_NOTE + "\n", encoding="utf-8")
    return written
