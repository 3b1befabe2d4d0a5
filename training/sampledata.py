"""Real sample scans from a package registry: the `totalsegmentator` 2.18.0 source distribution on PyPI.

No dataset URL is reachable from where this project runs, but PyPI is, and TotalSegmentator (Apache-2.0)
ships real CT and MR scans with reference segmentations in its test folder. Their references were
produced by TotalSegmentator, not drawn by hand. We download the sdist once (pip, no install), take only
the files listed in ``SAMPLES`` and write them as Slicer scenes (.mrb) and as plain files.

Label names come from the package's own class map (``totalsegmentator/map_to_binary.py``), read with
``ast.literal_eval``: the file is data to us, never executed.
"""

from __future__ import annotations

import ast
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from MedSegUNetLib.core.anatomy import known_label
from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.core.labels import Label

from .registry import cache_folder, download_from_index

if TYPE_CHECKING:
    import argparse

    from MedSegUNetLib.core.progress import Progress

PACKAGE, VERSION = "totalsegmentator", "2.18.0"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"  # of the file on PyPI, checked
ROOT = f"{PACKAGE}-{VERSION}"
REFERENCE = f"{ROOT}/tests/reference_files"
CLASS_MAP_FILE = f"{ROOT}/totalsegmentator/map_to_binary.py"
SOURCE_NOTE = (
    "Sample scans and reference segmentations from the TotalSegmentator 2.18.0 source distribution "
    "(PyPI, Apache-2.0, tests/reference_files). The references were produced by TotalSegmentator, not drawn by hand."
)


@dataclass(frozen=True)
class Sample:
    name: str  # our name for the scan (scene and folder name)
    image: str  # a file or a DICOM folder, relative to REFERENCE
    reference: str  # labelmap relative to REFERENCE
    class_map: str  # key of map_to_binary.class_map naming its label values ("": masks named by their files)
    role: str  # what the project uses it for
    masks: Tuple[str, ...] = ()  # one mask file per structure in the folder ``reference`` (a partial annotation)


# The aorta report's test CT: TotalSegmentator's vessel masks exist only on a crop of it, so the scene
# annotates these vessels and marks the rest of the scan "unlabeled" (not reviewed, teaches nothing).
AORTA_MASKS = (
    "aorta",
    "brachiocephalic_trunk",
    "subclavian_artery_left",
    "common_carotid_artery_left",
    "celiac_trunk",
    "superior_mesenteric_artery",
    "renal_arteries",
    "iliac_artery_left",
    "iliac_artery_right",
)
UNLABELED = "unlabeled"  # training's name for voxels that teach nothing (training/label_table.py)

SAMPLES = (
    Sample("abdomen-ct", "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz", "total", "training"),
    Sample(
        "heldout-ct",
        "example_ct_dicom",
        "example_seg_dicom.nii.gz",
        "total",
        "held-out evaluation (another patient, DICOM)",
    ),
    Sample("abdomen-mr", "example_mr_sm.nii.gz", "example_seg_mr.nii.gz", "total_mr", "MRI example"),
    Sample(
        "aorta-ct",
        "aorta_report/example_ct.nii.gz",
        "aorta_report/test_result/models",
        "",
        "training (partial: aorta and branches on a crop; early arterial phase)",
        AORTA_MASKS,
    ),
)


def label_for(value: int, name: str) -> Label:
    """Slicer terminology and colors for well-known structures (the engine's one table, core/anatomy.py)."""
    return known_label(value, name)


# --- the cache ---------------------------------------------------------------------------------------


def _wanted_members() -> List[str]:
    files = [f"{REFERENCE}/{sample.reference}" for sample in SAMPLES if not sample.masks]
    masks = [f"{REFERENCE}/{sample.reference}/{mask}.nii.gz" for sample in SAMPLES for mask in sample.masks]
    return files + masks + [CLASS_MAP_FILE]


def _member_is_wanted(name: str) -> bool:
    if name in _wanted_members():
        return True
    return any(name.startswith(f"{REFERENCE}/{sample.image}") for sample in SAMPLES)


def download_sdist(folder: Path) -> Path:
    """The TotalSegmentator sdist, checked against its known hash."""
    return download_from_index(f"{PACKAGE}=={VERSION}", SDIST, SDIST_SHA256, folder)


def extract_members(sdist: Path, target: Path) -> None:
    """Only the files we use; every member checked to stay inside ``target`` and to be a plain file."""
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            if not member.isfile() or not _member_is_wanted(member.name):
                continue
            relative = PurePosixPath(member.name)
            if relative.is_absolute() or ".." in relative.parts:
                raise MedSegError(f"archive member escapes the folder: {member.name}", sdist)
            destination = target.joinpath(*relative.parts[1:])  # drop "totalsegmentator-2.18.0/"
            destination.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            if source is None:  # only for members that are not regular files, skipped above
                raise MedSegError(f"archive member is not a readable file: {member.name}", sdist)
            with source, open(destination, "wb") as sink:
                shutil.copyfileobj(source, sink)


def fetch_sources(cache: Optional[Path] = None, log: Callable[[str], None] = print) -> Path:
    """The extracted sample files (``.../tests/reference_files``), downloading once into the cache."""
    cache = Path(cache or cache_folder())
    sources = cache / f"{PACKAGE}-{VERSION}-files"
    wanted = _wanted_members() + [f"{REFERENCE}/{sample.image}" for sample in SAMPLES]
    if (sources / ".complete").exists() and all(sources.joinpath(*PurePosixPath(m).parts[1:]).exists() for m in wanted):
        return sources  # complete, with every file this version uses (an older cache lacks newer samples)
    cache.mkdir(parents=True, exist_ok=True)
    log(f"downloading {PACKAGE}=={VERSION} (source distribution, ~40 MB) from the package index, once")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as work:
        sdist = download_sdist(Path(work))
        staging = Path(work) / "files"
        extract_members(sdist, staging)
        missing = [m for m in wanted if not staging.joinpath(*PurePosixPath(m).parts[1:]).exists()]
        if missing:
            raise MedSegError(f"the downloaded package lacks {missing[0]}", sdist)
        (staging / ".complete").write_text(SOURCE_NOTE + "\n", encoding="utf-8")
        if sources.exists():
            shutil.rmtree(sources)  # an earlier, interrupted extraction
        os.replace(staging, sources)  # atomic: a cache folder is complete or absent
    return sources


# --- class maps and conversion -----------------------------------------------------------------------


def read_class_maps(path: Path) -> Dict[str, Dict[int, str]]:
    """``class_map`` of map_to_binary.py, parsed as a literal (the file is never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    maps: Dict[str, Dict[int, str]] = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Dict)
            and any(isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets)
        ):
            for key, value in zip(node.value.keys, node.value.values):
                if key is None:
                    continue  # a ``**mapping`` entry; not one we use
                try:
                    maps[ast.literal_eval(key)] = {int(k): str(v) for k, v in ast.literal_eval(value).items()}
                except ValueError:
                    continue  # an entry built from other expressions; not one we use
    if not maps:
        raise MedSegError("holds no class_map literal", path)
    return maps


def labels_present(reference: sitk.Image, names: Dict[int, str]) -> List[Label]:
    values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(reference)) if v != 0]
    unknown = [v for v in values if v not in names]
    if unknown:
        raise MedSegError(f"label values {unknown} are not in the class map")
    return [label_for(value, names[value]) for value in values]


def assembled_masks(folder: Path, masks: Sequence[str], image: sitk.Image) -> Tuple[sitk.Image, List[Label]]:
    """One labelmap on the scan's grid from per-structure masks on a crop of it: structure ``i`` is ``i + 1``
    (where two masks overlap, the earlier one keeps the voxel), and the scan outside the crop is
    ``unlabeled``, since nobody looked there."""
    from MedSegUNetLib.core.geometry import Grid, ijk_to_lps, resample_onto

    grid = Grid.of(image)
    merged = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    crop = None
    for value, name in enumerate(masks, start=1):
        path = folder / f"{name}.nii.gz"
        mask = sitk.ReadImage(str(path))
        if not grid.holds_lattice(ijk_to_lps(mask)):
            raise MedSegError("is not on a crop of its scan's grid", path)
        placed = sitk.GetArrayFromImage(resample_onto(mask, grid, sitk.sitkNearestNeighbor, default_value=0))
        merged[(placed > 0) & (merged == 0)] = value
        if crop is None:
            ones = sitk.Image(mask.GetSize(), sitk.sitkUInt8) + 1
            ones.CopyInformation(mask)
            crop = sitk.GetArrayFromImage(resample_onto(ones, grid, sitk.sitkNearestNeighbor, default_value=0)) > 0
    labels = [label_for(value, name) for value, name in enumerate(masks, start=1)]
    if crop is not None and not crop.all():
        merged[~crop] = len(masks) + 1
        labels.append(Label(len(masks) + 1, UNLABELED, (0.5, 0.5, 0.5)))
    reference = sitk.GetImageFromArray(merged)
    reference.CopyInformation(image)
    return reference, labels


@dataclass
class WrittenSample:
    name: str
    role: str
    image: Path  # .nrrd (a DICOM series converted) or the original NIfTI
    labelmap: Path  # .nii.gz, the package's reference
    segmentation: Path  # .seg.nrrd with names and colors
    scene: Path  # .mrb
    dicom: Optional[Path] = None


def write_sample(sample: Sample, sources: Path, output: Path, class_maps: Dict[str, Dict[int, str]]) -> WrittenSample:
    from MedSegUNetLib.core.geometry import Grid, resample_onto
    from MedSegUNetLib.imageio.images import read_image, write_segmentation

    from .scene_writer import ScenePair, write_mrb

    folder = output / sample.name
    folder.mkdir(parents=True, exist_ok=True)
    source_image = sources / sample.image
    image = read_image(source_image).image
    if sample.masks:
        reference, labels = assembled_masks(sources / sample.reference, sample.masks, image)
    else:
        reference = sitk.ReadImage(str(sources / sample.reference))
        if not Grid.of(reference).same_voxels(Grid.of(image)):
            raise MedSegError("reference is not on its scan's grid", sources / sample.reference)
        # the held-out reference is stored flipped (LAS) against its DICOM (LPS): put it on the scan's own grid
        reference = resample_onto(reference, Grid.of(image), sitk.sitkNearestNeighbor)
        labels = labels_present(reference, class_maps[sample.class_map])
    dicom = None
    if source_image.is_dir():
        dicom = folder / "dicom"
        if dicom.exists():
            shutil.rmtree(dicom)
        shutil.copytree(source_image, dicom)
        image_file = folder / "image.nrrd"
        sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), str(image_file), useCompression=True)
    else:
        image_file = folder / "image.nii.gz"
        shutil.copyfile(source_image, image_file)
    labelmap = folder / "reference.nii.gz"
    sitk.WriteImage(sitk.Cast(reference, sitk.sitkUInt8), str(labelmap), useCompression=True)
    segmentation = write_segmentation(folder / "reference.seg.nrrd", reference, labels)
    scene = write_mrb(
        output / f"{sample.name}.mrb",
        sample.name,
        [ScenePair(sample.name, image_file, segmentation, f"{sample.name} reference")],
    )
    return WrittenSample(sample.name, sample.role, image_file, labelmap, segmentation, scene, dicom)


def write_samples(
    output: Path,
    names: Optional[Sequence[str]] = None,
    cache: Optional[Path] = None,
    log: Callable[[str], None] = print,
) -> List[WrittenSample]:
    sources = fetch_sources(cache, log)
    class_maps = read_class_maps(sources / "totalsegmentator" / "map_to_binary.py")
    chosen = [s for s in SAMPLES if names is None or s.name in names]
    output.mkdir(parents=True, exist_ok=True)
    written = [write_sample(sample, sources / "tests" / "reference_files", output, class_maps) for sample in chosen]
    (output / "SOURCE.txt").write_text(SOURCE_NOTE + "\n", encoding="utf-8")
    return written


# --- `medsegunet sample-data` ------------------------------------------------------------------------


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .lesion_samples import lesion_sample_names

    parser = commands.add_parser(
        "sample-data",
        help="write real sample CT/MR scans with reference segmentations as Slicer scenes and plain files",
        description=f"{SOURCE_NOTE} With --lesions: four lung CT lesion cases with DICOM RT structure sets "
        "(pycerr 2.5.1's radiomics phantom, CC BY-NC 3.0, non-commercial). Downloaded once into "
        "$MEDSEGUNET_CACHE (default ~/.cache/medsegunet).",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("medsegunet-samples"), help="folder to write (medsegunet-samples)"
    )
    parser.add_argument(
        "--only", nargs="+", choices=[s.name for s in SAMPLES] + lesion_sample_names(), help="just these samples"
    )
    parser.add_argument(
        "--lesions",
        action="store_true",
        help="write the four lung lesion cases (CT + RT structure set; CC BY-NC 3.0) instead of the default samples",
    )
    parser.set_defaults(handler=run_sample_data_command, progress="none")


def run_sample_data_command(args: argparse.Namespace, progress: Progress) -> dict:
    from .lesion_samples import LESION_NOTE, lesion_sample_names, write_lesion_samples

    lesion_names = [n for n in args.only or [] if n in lesion_sample_names()]
    other_names = [n for n in args.only or [] if n not in lesion_sample_names()]
    if other_names or not (args.lesions or lesion_names):
        written = write_samples(args.output, other_names or None)
        for sample in written:
            print(f"{sample.name:<11} {sample.role}")
            print(f"  scene   {sample.scene}")
            print(f"  image   {sample.dicom or sample.image}")
            print(f"  labels  {sample.segmentation} ({sample.labelmap.name} as a labelmap)")
        print(SOURCE_NOTE)
    if args.lesions or lesion_names:
        for lesion in write_lesion_samples(args.output, lesion_names or None):
            print(f"{lesion.name:<11} lung CT, one GTV of {lesion.lesion_ml:.1f} mL")
            print(f"  scene   {lesion.scene}")
            print(f"  dicom   {lesion.dicom} (CT series + RT structure set)")
            print(f"  labels  {lesion.segmentation}")
        print(LESION_NOTE)
    return {"output": str(args.output)}
