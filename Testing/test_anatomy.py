"""Well-known structure names (TotalSegmentator's class names) get Slicer's terminology and anatomy colors
from the engine's one table (core/anatomy.py): in an imported nnU-Net model's bundle and in the sample data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from MedSegUNetLib.core.anatomy import STRUCTURES, known_label, known_labels
from MedSegUNetLib.core.labels import palette_color
from MedSegUNetLib.importers.nnunet import bundle_meta, read_model

ARCHITECTURE = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 2,
        "features_per_stage": [4, 8],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [2, 2, 2]],
        "n_conv_per_stage": [1, 1],
        "n_conv_per_stage_decoder": [1],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
}


def model_folder(tmp_path: Path, labels: dict) -> Path:
    folder = tmp_path / "Dataset300_Total" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True)
    plans = {
        "plans_name": "nnUNetPlans",
        "transpose_forward": [0, 1, 2],
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": 50.0, "std": 100.0, "percentile_00_5": -900.0, "percentile_99_5": 1200.0}
        },
        "configurations": {
            "3d_fullres": {
                "patch_size": [32, 32, 32],
                "spacing": [3.0, 3.0, 3.0],
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "architecture": ARCHITECTURE,
            }
        },
    }
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "file_ending": ".nii.gz"}
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder


def test_imported_totalsegmentator_names_get_slicer_terminology_and_colors(tmp_path):
    labels = {"background": 0, "liver": 1, "kidney_left": 2, "kidney_right": 3, "aorta": 4, "my lesion": 5}
    labels.update({"lung_middle_lobe_right": 6})
    meta = bundle_meta(read_model(model_folder(tmp_path, labels)), ["0"], "checkpoint_final.pth", (), "T", "m", None)
    by_name = {label.name: label for label in meta.labels}
    assert [label.value for label in meta.labels] == [1, 2, 3, 4, 5, 6]
    assert "~SCT^10200004^Liver~^^~" in by_name["liver"].terminology
    assert by_name["liver"].color == (0.867, 0.51, 0.396)  # as Slicer's GenericAnatomyColors shows a liver
    assert "~SCT^64033007^Kidney~SCT^7771000^Left~" in by_name["kidney_left"].terminology
    assert "~SCT^64033007^Kidney~SCT^24028007^Right~" in by_name["kidney_right"].terminology
    assert "SCT^15825003^Aorta" in by_name["aorta"].terminology
    assert "SCT^72481006^Middle lobe of right lung~^^~" in by_name["lung_middle_lobe_right"].terminology
    # a name outside the table keeps the palette and no terminology
    assert by_name["my lesion"].terminology is None and by_name["my lesion"].color == palette_color(4)


@pytest.mark.parametrize("name", ["kidney_middle", "left", "_left", "liverish", "vertebrae_L1"])
def test_names_outside_the_table_have_no_terminology(name):
    assert known_label(3, name).terminology is None
    assert known_label(3, name).color == palette_color(2)


def test_every_entry_is_a_slicer_terminology_with_a_color():
    for name, (rgb, code) in STRUCTURES.items():
        assert all(0 <= c <= 255 for c in rgb), name
        scheme, value, meaning = code.split("^")
        assert scheme == "SCT" and value.isdigit() and meaning, name
        label = known_labels([name])[0]
        parts = label.terminology.split("~")
        assert len(parts) == 7 and parts[2] == code, name


def test_sample_data_labels_come_from_the_same_table():
    from training.sampledata import label_for

    for name in ("liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta", "pancreas"):
        assert label_for(1, name) == known_label(1, name)
    # the colors the shipped model's structures had before the table moved into the engine
    assert label_for(1, "spleen").color == (0.616, 0.424, 0.635)
    assert label_for(1, "kidney_right").color == (0.725, 0.4, 0.325)


def test_codes_agree_with_dicoms_snomed_list():
    """Each code DICOM's SNOMED CT list (pydicom's copy) knows names the same structure and side: a code for
    'upper lobe of lung' is not 'upper lobe of left lung' (the side is a modifier). Core organs must be there."""
    from pydicom.sr._concepts_dict import concepts

    from MedSegUNetLib.core.anatomy import SIDES, STRUCTURES

    dicom: dict = {}
    for entries in concepts["SCT"].values():
        for code, (meaning, _groups) in entries.items():
            dicom.setdefault(code, []).append(meaning.lower())
    typed = [type_code for _rgb, type_code in STRUCTURES.values()] + list(SIDES.values())
    for type_code in typed:
        _scheme, code, meaning = type_code.split("^")
        for side in ("left", "right"):
            if code in dicom:
                assert all((side in meaning.lower().split()) == (side in m.split()) for m in dicom[code]), type_code
    for organ in ("liver", "spleen", "kidney", "stomach", "aorta", "pancreas", "lung"):
        assert STRUCTURES[organ][1].split("^")[1] in dicom, organ
