"""A corpus of hostile files, generated here (nothing downloaded), each given to the real command line.

Every file runs ``python -m MedSegUNetLib segment|train`` in a child process, as the Slicer panel starts
it, under an address-space limit (``ulimit -v``, 3 GiB above what the engine's imports take: a header
that made the engine allocate what it claims would fail differently than a refusal), with its working folder,
HOME and TMPDIR in watched folders. Each
must give: a non-zero exit (1: bad input), exactly one stderr line ``medsegunet: error: PATH: ...``
naming the file, no traceback, a JSON ``error`` record last on stdout, no output and no temporary in the
work folder, an empty TMPDIR, and nothing created, changed or removed anywhere else in the test's tree.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import MODULE_DIR, REPO, address_space_limit, program
from test_cli_segment import make_bad_input, write_dicom_series


@dataclass
class Hostile:
    """``build(corpus, work, fixtures)`` writes the file(s) and returns (argv, the path the error must name)."""

    build: Callable[[Path, Path, dict], tuple]
    message: str
    exit_code: int = 1


# --- image headers and pixels ----------------------------------------------------------------------


def _nrrd(path: Path, size: int, encoding: str = "raw") -> Path:
    header = (
        f"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: {size} {size} {size}\n"
        "space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\n"
        f"encoding: {encoding}\nendian: little\n\n"
    )
    data = gzip.compress(bytes(4096)) if encoding == "gzip" else bytes(4096)
    path.write_bytes(header.encode("ascii") + data)
    return path


def _metaimage(path: Path, size: int, element_type: str = "MET_SHORT", detached: bool = False) -> Path:
    data_file = path.with_suffix(".raw").name if detached else "LOCAL"
    header = (
        f"ObjectType = Image\nNDims = 3\nDimSize = {size} {size} {size}\nElementType = {element_type}\n"
        f"ElementSpacing = 1 1 1\nElementByteOrderMSB = False\nElementDataFile = {data_file}\n"
    )
    if detached:
        path.write_text(header, encoding="ascii")
        path.with_suffix(".raw").write_bytes(bytes(4096))
    else:
        path.write_bytes(header.encode("ascii") + bytes(4096))
    return path


def _nifti(path: Path, dims, datatype: int = 4, bitpix: int = 16) -> Path:
    """A NIfTI-1 single file (.nii, or .nii.gz) with the header fields that matter, and 4 KB of data."""
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, len(dims), *dims, *[1] * (7 - len(dims)))
    struct.pack_into("<hh", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", header, 108, 352)  # vox_offset
    struct.pack_into("<h", header, 252, 1)  # qform_code
    header[344:348] = b"n+1\0"
    content = bytes(header) + bytes(4) + bytes(4096)
    path.write_bytes(gzip.compress(content) if path.name.endswith(".gz") else content)
    return path


def segment_argv(image: Path, work: Path, fixtures: dict, bundle: Path = None) -> list:
    model = bundle or fixtures["small_bundle"]
    return [
        "segment",
        str(image),
        "-m",
        str(model),
        "-o",
        str(work / "out.seg.nrrd"),
        "--device",
        "cpu",
        "--progress",
        "json",
    ]


def image_case(make: Callable[[Path], Path], message: str) -> Hostile:
    def build(corpus, work, fixtures):
        image = make(corpus)
        return segment_argv(image, work, fixtures), image

    return Hostile(build, message)


def _not_finite(corpus: Path) -> Path:
    path = corpus / "not_finite.nrrd"
    array = np.full((8, 8, 8), np.inf, np.float32)
    array[::2] = -np.inf
    array[1::4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def _dicom_with_a_missing_slice(corpus: Path, fixtures: dict) -> Path:
    folder = corpus / "dicom_gap"
    image = sitk.Cast(sitk.ReadImage(str(fixtures["ct_chest"])), sitk.sitkInt16)[:, :, :6]
    write_dicom_series(image, folder, "1.2.826.0.1.3680043.2.1125.7")
    sorted(folder.iterdir())[3].unlink()  # slice 4 of 6 gone: ITK would stack 5 slices at a stretched spacing
    return folder


def _dicom_with_two_series(corpus: Path, fixtures: dict) -> Path:
    folder = corpus / "dicom_two"
    image = sitk.Cast(sitk.ReadImage(str(fixtures["ct_chest"])), sitk.sitkInt16)[:, :, :3]
    write_dicom_series(image, folder, "1.2.3.4.501")
    write_dicom_series(image, folder, "1.2.3.4.502")
    return folder


# --- bundles -------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file next to the corpus: the snapshot would see it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bundle_case(make: Callable[[Path, dict], Path], message: str) -> Hostile:
    def build(corpus, work, fixtures):
        bundle = make(corpus, fixtures)
        return segment_argv(fixtures["ct_chest"], work, fixtures, bundle), bundle

    return Hostile(build, message)


def _torch_pickle_as_bundle(corpus: Path, fixtures: dict) -> Path:
    path = corpus / "model.safetensors"
    torch.save({"state_dict": _Payload(str(corpus.parent / "PWNED-torch"))}, path)
    return path


def _raw_pickle_as_bundle(corpus: Path, fixtures: dict) -> Path:
    path = corpus / "raw.safetensors"
    path.write_bytes(pickle.dumps(_Payload(str(corpus.parent / "PWNED-pickle")), protocol=4))
    return path


def _bundle_with_wrong_weight_shapes(corpus: Path, fixtures: dict) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(fixtures["small_bundle"]), "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = handle.metadata()
    name = next(n for n, t in tensors.items() if t.dim() == 5)  # a convolution kernel
    tensors[name] = torch.zeros(tensors[name].shape[0] * 2, *tensors[name].shape[1:])
    path = corpus / "wrong_shapes.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


# --- scenes for train ----------------------------------------------------------------------------


def train_case(make: Callable[[Path, dict], Path], message: str) -> Hostile:
    def build(corpus, work, fixtures):
        scene = make(corpus, fixtures)
        return [
            "train",
            str(scene),
            "-o",
            str(work / "model"),
            "--max-steps",
            "1",
            "--device",
            "cpu",
            "--progress",
            "json",
        ], scene

    return Hostile(build, message)


def _zip(path: Path, members: Dict) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for member, content in members.items():
            archive.writestr(member, content)
    return path


def _zip_slip(corpus: Path, fixtures: dict) -> Path:
    return _zip(corpus / "slip.mrb", {"s/s.mrml": "<MRML></MRML>", "s/Data/a.nrrd": "x", "../../slipped.txt": "pwned"})


def _symlink_member(corpus: Path, fixtures: dict) -> Path:
    link = zipfile.ZipInfo("s/Data/link.seg.nrrd")
    link.external_attr = 0o120777 << 16
    return _zip(corpus / "link.mrb", {"s/s.mrml": "<MRML></MRML>", link: "/etc/passwd"})


def _members_claiming_gigabytes(corpus: Path, fixtures: dict) -> Path:
    """A 1 KB zip whose central directory says each of its four members unpacks to 4 GiB."""
    path = _zip(
        corpus / "bomb.mrb",
        {"s/s.mrml": "<MRML></MRML>", "s/Data/a.raw": "a", "s/Data/b.raw": "b", "s/Data/c.raw": "c"},
    )
    raw = bytearray(path.read_bytes())
    position = raw.find(b"PK\x01\x02")
    while position >= 0:
        raw[position + 24 : position + 28] = (0xFFFFFFFE).to_bytes(4, "little")  # uncompressed size
        position = raw.find(b"PK\x01\x02", position + 4)
    path.write_bytes(bytes(raw))
    assert path.stat().st_size < 2000
    return path


LAUGHS = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))


def _mrml(corpus: Path, name: str, text: str) -> Path:
    folder = corpus / name
    folder.mkdir()
    (folder / f"{name}.mrml").write_text(text, encoding="utf-8")
    return folder / f"{name}.mrml"


def _entity_expansion_bomb(corpus: Path, fixtures: dict) -> Path:
    text = f'<?xml version="1.0"?><!DOCTYPE MRML [<!ENTITY l0 "ha">{LAUGHS}]><MRML><Volume id="v" name="&l9;"/></MRML>'
    return _mrml(corpus, "laughs", text)


def _external_entity(corpus: Path, fixtures: dict) -> Path:
    text = (
        '<?xml version="1.0"?><!DOCTYPE MRML [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        '<MRML><Volume id="v" name="&x;"/></MRML>'
    )
    return _mrml(corpus, "external", text)


def _network_entity(corpus: Path, fixtures: dict) -> Path:
    text = '<?xml version="1.0"?><!DOCTYPE MRML SYSTEM "http://192.0.2.1/mrml.dtd"><MRML><Volume id="v"/></MRML>'
    return _mrml(corpus, "network", text)


def _escaping_file_name(corpus: Path, fixtures: dict) -> Path:
    from training.scene_writer import ScenePair, write_mrml_scene

    pair = ScenePair("ct", fixtures["ct_chest"], fixtures["chest_segmentation"], "seg")
    scene = write_mrml_scene(corpus / "escape", "escape", [pair])
    shutil.copyfile(fixtures["chest_segmentation"], corpus / "outside.seg.nrrd")
    text = scene.read_text(encoding="utf-8").replace('fileName="Data/seg.seg.nrrd"', 'fileName="../outside.seg.nrrd"')
    assert "../outside.seg.nrrd" in text
    scene.write_text(text, encoding="utf-8")
    return scene


CORPUS = {
    # Headers that claim absurd sizes, one per format: refused before allocating (see the address-space limit).
    "nrrd-100000^3": image_case(lambda c: _nrrd(c / "huge.nrrd", 100000), "claims 100000x100000x100000 voxels"),
    "nrrd-gzip-2000^3": image_case(
        lambda c: _nrrd(c / "big.nrrd", 2000, "gzip"), "claims 2000x2000x2000 voxels: reading it needs about"
    ),
    "nii-30000^3": image_case(
        lambda c: _nifti(c / "huge.nii", (30000, 30000, 30000)), "claims 30000x30000x30000 voxels"
    ),
    "nii.gz-2000^3": image_case(
        lambda c: _nifti(c / "big.nii.gz", (2000, 2000, 2000)), "claims 2000x2000x2000 voxels: reading it needs about"
    ),
    "mha-100000^3": image_case(lambda c: _metaimage(c / "huge.mha", 100000), "claims 100000x100000x100000 voxels"),
    "mhd-2000^3": image_case(
        lambda c: _metaimage(c / "big.mhd", 2000, detached=True), "claims 2000x2000x2000 voxels: reading it needs about"
    ),
    # Pixels that are not a scalar real volume.
    "mha-unknown-pixel-type": image_case(
        lambda c: _metaimage(c / "other.mha", 8, "MET_OTHER"), "unknown or unsupported pixel type"
    ),
    "nii-unknown-datatype": image_case(
        lambda c: _nifti(c / "dt9999.nii", (8, 8, 8), datatype=9999), "not a readable image"
    ),
    "nii-complex": image_case(lambda c: _nifti(c / "complex.nii", (8, 8, 8), datatype=32, bitpix=64), "complex-valued"),
    "nrrd-nan-and-inf-only": image_case(_not_finite, "no finite voxel values"),
    "2d": image_case(lambda c: make_bad_input("2d", c), "is a 2D image"),
    "4d": image_case(lambda c: make_bad_input("4d", c), "is a 4D image"),
    "dicom-missing-slice": Hostile(
        lambda c, w, f: (segment_argv(_dicom_with_a_missing_slice(c, f), w, f), c / "dicom_gap"),
        "not evenly spaced: 20 mm between slices 3 and 4 where the others are 10 mm apart",
    ),
    "dicom-two-series": Hostile(
        lambda c, w, f: (segment_argv(_dicom_with_two_series(c, f), w, f), c / "dicom_two"),
        "holds 2 DICOM series, pick one with --series: 1.2.3.4.501; 1.2.3.4.502",
    ),
    # Bundles.
    "torch-pickle-as-bundle": bundle_case(_torch_pickle_as_bundle, "pickles are never loaded"),
    "raw-pickle-as-bundle": bundle_case(_raw_pickle_as_bundle, "pickles are never loaded"),
    "bundle-wrong-weight-shapes": bundle_case(_bundle_with_wrong_weight_shapes, "the declared network wants"),
    # Scenes given to train.
    "mrb-zip-slip": train_case(_zip_slip, "would land outside the extraction folder"),
    "mrb-symlink-member": train_case(_symlink_member, "is a symbolic link"),
    "mrb-claims-16-GiB": train_case(_members_claiming_gigabytes, "would unpack to 16.0 GiB, more than the limit"),
    "mrml-entity-expansion": train_case(_entity_expansion_bomb, "unsafe XML"),
    "mrml-external-entity": train_case(_external_entity, "unsafe XML"),
    "mrml-network-dtd": train_case(_network_entity, "unsafe XML"),
    "mrml-file-name-escapes": train_case(_escaping_file_name, "outside the scene's folder"),
}


# --- running each file in a watched sandbox --------------------------------------------------------


def snapshot(root: Path, skip: List[Path]) -> dict:
    """Every path under ``root`` (but ``skip``) with its type, size and mtime; folders' mtimes change
    when anything is created or removed in them."""
    state = {}
    for folder, folders, files in os.walk(root):
        here = Path(folder)
        folders[:] = [name for name in folders if here / name not in skip]
        for name in [*folders, *files]:
            path = here / name
            info = path.lstat()
            state[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return state


@dataclass
class Outcome:
    result: subprocess.CompletedProcess
    named: Path
    base: Path
    before: dict
    after: dict


def run_sandboxed(name: str, hostile: Hostile, base: Path, fixtures: dict) -> Outcome:
    corpus, work, home, tmp = (base / part for part in ("corpus", "work", "home", "tmp"))
    for folder in (corpus, work, tmp):
        folder.mkdir(parents=True)
    shutil.copytree(fixtures["warm_home"], home, copy_function=shutil.copy2)
    argv, named = hostile.build(corpus, work, fixtures)
    skip = [work, tmp]  # the work folder may be used; TMPDIR is checked empty at the end
    before = snapshot(base, skip)
    environment = dict(
        os.environ, HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=os.pathsep.join([str(MODULE_DIR), str(REPO)])
    )
    for variable in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR"):
        environment.pop(variable, None)
    limit_kib = fixtures["address_space"] // 1024
    command = [
        "/bin/sh",
        "-c",
        'ulimit -v "$0" && exec "$@"',
        str(limit_kib),
        sys.executable,
        "-m",
        program(argv[0]),
        *argv,
    ]
    result = subprocess.run(
        command,
        cwd=work,
        env=environment,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
    )
    return Outcome(result, named, base, before, snapshot(base, skip))


@pytest.fixture(scope="module")
def fixtures(small_bundle, ct_chest, chest_segmentation, engine_baseline) -> dict:
    """The inputs the corpus builds on, the address-space limit, and a HOME as a user's looks after a
    first run (see ``engine_baseline``)."""
    return {
        "small_bundle": small_bundle,
        "ct_chest": ct_chest,
        "chest_segmentation": chest_segmentation,
        "warm_home": engine_baseline[1],
        "address_space": address_space_limit(engine_baseline),
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, fixtures) -> Dict[str, Outcome]:
    """All of the corpus, two children at a time (CI machines have two cores)."""
    root = tmp_path_factory.mktemp("hostile")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(run_sandboxed, name, hostile, root / name, fixtures) for name, hostile in CORPUS.items()
        }
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_hostile_file_is_refused_cleanly(outcomes, name):
    outcome, hostile = outcomes[name], CORPUS[name]
    result = outcome.result
    assert result.returncode == hostile.exit_code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"medsegunet: error: {outcome.named}: "), lines[0]
    assert hostile.message in lines[0], lines[0]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert records and records[-1]["stage"] == "error" and records[-1]["message"] in lines[0], result.stdout[-2000:]
    assert list((outcome.base / "work").iterdir()) == [], "no output and no temporary in the work folder"
    assert list((outcome.base / "tmp").iterdir()) == [], "TMPDIR is left empty"
    assert outcome.after == outcome.before, "nothing created, changed or removed outside the work folder"


def test_the_sandbox_sees_writes_outside_the_work_folder(tmp_path, fixtures):
    """The checks above can fail: a run that writes into HOME and leaves a file in TMPDIR is caught."""

    def build(corpus, work, fixtures):
        return [
            "create-bundle",
            "-o",
            str(corpus.parent / "home" / "stray.safetensors"),
            "--labels",
            "a",
            "--filters",
            "4",
        ], corpus

    outcome = run_sandboxed("probe", Hostile(build, ""), tmp_path / "probe", fixtures)
    assert outcome.result.returncode == 0, outcome.result.stderr
    assert set(outcome.after) - set(outcome.before) == {"home/stray.safetensors"}
