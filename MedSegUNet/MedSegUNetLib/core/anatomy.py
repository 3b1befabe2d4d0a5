"""Well-known structures by the names TotalSegmentator's classes use (``liver``, ``kidney_left``,
``lung_upper_lobe_right``): Slicer terminology (SNOMED CT codes) and GenericAnatomyColors-like colors, so
that Slicer shows a segment named so as it shows its own anatomy. The one table of the project: the sample
data (training) and the nnU-Net and MONAI importers label through :func:`known_labels`.

A name is looked up as given (lower case); failing that, a ``_left``/``_right`` suffix becomes the
terminology's side modifier (``kidney_left``: Kidney, Left). Names not in the table keep the palette.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from MedSegUNetLib.core.labels import Label, palette_color

CATEGORY = "Segmentation category and type - 3D Slicer General Anatomy list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"
SIDES = {"left": "SCT^7771000^Left", "right": "SCT^24028007^Right"}

# name: (RGB 0..255, SNOMED CT type "SCT^code^meaning")
STRUCTURES: Dict[str, Tuple[Tuple[int, int, int], str]] = {
    "liver": ((221, 130, 101), "SCT^10200004^Liver"),
    "spleen": ((157, 108, 162), "SCT^78961009^Spleen"),
    "kidney": ((185, 102, 83), "SCT^64033007^Kidney"),
    "stomach": ((216, 132, 105), "SCT^69695003^Stomach"),
    "aorta": ((224, 97, 76), "SCT^15825003^Aorta"),
    "pancreas": ((249, 180, 111), "SCT^15776009^Pancreas"),
    "gallbladder": ((139, 150, 98), "SCT^28231008^Gallbladder"),
    "adrenal_gland": ((249, 186, 150), "SCT^23451007^Adrenal gland"),
    "esophagus": ((211, 171, 143), "SCT^32849002^Esophagus"),
    "trachea": ((182, 228, 255), "SCT^44567001^Trachea"),
    "heart": ((206, 110, 84), "SCT^80891009^Heart"),
    "urinary_bladder": ((222, 154, 132), "SCT^89837001^Urinary bladder"),
    "prostate": ((230, 158, 140), "SCT^41216001^Prostate"),
    "brain": ((250, 250, 225), "SCT^12738006^Brain"),
    "small_bowel": ((205, 167, 142), "SCT^30315005^Small intestine"),
    "duodenum": ((255, 253, 229), "SCT^38848004^Duodenum"),
    "colon": ((204, 168, 143), "SCT^71854001^Colon"),
    "inferior_vena_cava": ((0, 151, 206), "SCT^64131007^Inferior vena cava"),
    "superior_vena_cava": ((0, 151, 206), "SCT^48345005^Superior vena cava"),
    "pulmonary_artery": ((0, 122, 171), "SCT^81040000^Pulmonary artery"),
    "brachiocephalic_trunk": ((216, 101, 79), "SCT^12691009^Brachiocephalic trunk"),
    "common_carotid_artery": ((216, 101, 79), "SCT^32062004^Common carotid artery"),
    "subclavian_artery": ((216, 101, 79), "SCT^36765005^Subclavian artery"),
    "iliac_artery": ((216, 101, 79), "SCT^73634005^Common iliac artery"),
    "iliac_vena": ((0, 151, 206), "SCT^46027005^Common iliac vein"),
    "thyroid_gland": ((220, 160, 30), "SCT^69748006^Thyroid gland"),
    "spinal_cord": ((244, 214, 49), "SCT^2748008^Spinal cord"),
    "lung": ((197, 165, 145), "SCT^39607008^Lung"),
    # DICOM's lobes of lung (CID 6170): upper and lower lobe with the side as a modifier, the middle lobe alone
    "lung_upper_lobe": ((172, 138, 115), "SCT^45653009^Upper lobe of lung"),
    "lung_middle_lobe_right": ((182, 228, 255), "SCT^72481006^Middle lobe of right lung"),
    "lung_lower_lobe": ((202, 164, 140), "SCT^90572001^Lower lobe of lung"),
    "sacrum": ((241, 214, 145), "SCT^54735007^Sacrum"),
    "sternum": ((241, 214, 145), "SCT^56873002^Sternum"),
    "skull": ((241, 214, 145), "SCT^89546000^Skull"),
    "femur": ((241, 214, 145), "SCT^71341001^Femur"),
    "humerus": ((241, 214, 145), "SCT^85050009^Humerus"),
    "scapula": ((241, 214, 145), "SCT^79601000^Scapula"),
    "clavicula": ((241, 214, 145), "SCT^51299004^Clavicle"),
}


def terminology(type_code: str, modifier: str = "") -> str:
    """A terminology string as Slicer writes it into a .seg.nrrd (category~type~modifier~context~region...)."""
    return f"{CATEGORY}~SCT^123037004^Anatomical Structure~{type_code}~{modifier or '^^'}~{REGION_CONTEXT}~^^~^^"


def known_structure(name: str) -> Optional[Tuple[Tuple[float, float, float], str]]:
    """The color (0..1) and terminology of a well-known structure's name; None for any other name."""
    key = name.strip().lower().replace(" ", "_")
    side = ""
    if key not in STRUCTURES:
        base, _, suffix = key.rpartition("_")
        if suffix not in SIDES or base not in STRUCTURES:
            return None
        key, side = base, SIDES[suffix]
    rgb, type_code = STRUCTURES[key]
    color = (round(rgb[0] / 255, 3), round(rgb[1] / 255, 3), round(rgb[2] / 255, 3))
    return color, terminology(type_code, side)


def names_a_side(name: str) -> bool:
    """Whether a structure's name says left or right (``kidney_left``, ``Left lung``, ``rib_right_4``)."""
    words = "".join(c if c.isalnum() else " " for c in name.lower()).split()
    return any(word in SIDES for word in words)


def known_label(value: int, name: str) -> Label:
    """The label of value ``value`` named ``name``: the table's color and terminology, else the palette's color."""
    known = known_structure(name)
    if known is None:
        return Label(value, name, palette_color(value - 1))
    return Label(value, name, known[0], known[1])


def known_labels(names: Sequence[str]) -> List[Label]:
    """Values 1, 2, ... for ``names``, each labelled as :func:`known_label` does."""
    return [known_label(value, name) for value, name in enumerate(names, start=1)]
