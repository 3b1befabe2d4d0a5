"""The panel's model line and details (MedSegUNet/MedSegUNetPanel/model_text.py): a bundle's metadata in
words and units."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import MODULE_DIR


@pytest.fixture(scope="module")
def words() -> ModuleType:
    sys.path.insert(0, str(MODULE_DIR))  # the module's helper packages, as Slicer finds them beside the module
    from MedSegUNetPanel import model_text

    return model_text


def shipped_meta() -> Any:
    from MedSegUNetLib.model.bundle import read_bundle_metadata
    from MedSegUNetLib.model.shipped import find_model

    return read_bundle_metadata(find_model("abdomen-ct"))


def test_structures_read_as_words_with_sides_paired(words):
    groups = words.structureGroups
    assert groups(["spleen", "kidney_right", "kidney_left", "left lung", "right lung", "aorta"]) == [
        "spleen", "kidneys", "lungs", "aorta",
    ]  # fmt: skip
    assert groups(["adrenal_gland_left", "iliac_artery_left", "iliac_artery_right"]) == [
        "adrenal gland left", "iliac arteries",
    ]  # fmt: skip
    assert [words.plural(w) for w in ("artery", "rib", "gluteus maximus")] == [
        "arteries", "ribs", "left and right gluteus maximus",
    ]  # fmt: skip


def test_the_shipped_model_in_one_line_and_in_details(words):
    meta, path = shipped_meta(), Path("abdomen-ct.safetensors")
    names = [label.name for label in meta.labels]
    line = words.modelSummary(meta, path)
    assert line.startswith(f"{len(names)} structures (spleen, kidneys, ") and ", 3 mm, trained on 1 case" in line
    details = words.modelDetails(meta, path)
    metrics = meta.provenance["metrics"]
    for name in names:
        dice = metrics[f"dice_{name}"]
        assert f"{name}: Dice {dice:.2f}, 95% Hausdorff " in details, name
    assert "dice_" not in details and "hd95_mm" not in details  # words, not raw keys
    renamed = words.modelSummary(meta, Path("model-20261204/model.safetensors"))
    assert renamed.startswith(f"{meta.name}: ")


def test_durations_distances_and_counts_in_plain_units(words):
    assert [words.duration(s) for s in (30, 600, 3700)] == ["30 s", "10 min", "1 h 2 min"]
    assert [words.hausdorffText(v) for v in (209.04, 3.14159, None)] == [
        "209 mm", "3.1 mm", "not measured (a mask was empty)",
    ]  # fmt: skip
    assert words.millimetres((3.0, 3.0, 3.0)) == "3 mm" and words.millimetres((0.8, 0.8, 1.5)) == "0.8 × 0.8 × 1.5 mm"
    assert [words.casesText(n) for n in (1, 4)] == ["1 case", "4 cases"]


def test_an_imported_models_details_say_where_it_came_from_and_its_licence(words):
    import dataclasses

    meta = shipped_meta()
    assert not [line for line in words.modelDetails(meta, Path("m.safetensors")).splitlines() if "Imported" in line]
    source = {"format": "nnU-Net v2", "trainer": "nnUNetTrainer_4000epochs", "folds": ["0", "1"]}
    imported = dataclasses.replace(
        meta, provenance={**meta.provenance, "source": {**source, "licence": "CC BY 4.0 " * 60}}
    )
    details = words.modelDetails(imported, Path("m.safetensors")).splitlines()
    assert "Imported from nnU-Net v2: trainer nnUNetTrainer_4000epochs; folds 0, 1" in details
    licence = [line for line in details if line.startswith("Licence of the source (it applies): CC BY 4.0")]
    assert len(licence) == 1 and licence[0].endswith("…") and len(licence[0]) < 400
