"""nnU-Net v2 trained-model folders (``TRAINER__PLANS__CONFIGURATION/`` with ``plans.json``,
``dataset.json`` and ``fold_K/checkpoint_*.pth``) turned into a bundle description and weights.

What nnU-Net's predictor does, carried over: the configuration's network (PlainConvUNet or
ResidualEncoderUNet, its layer types from an allowlist), spacing, ``transpose_forward`` and patch; the
image's own axes (no reorientation); the normalization the plans name per channel; the mirroring axes the
checkpoint allows (never a trainer class looked up by name); the folds' logits averaged. Labels named as
TotalSegmentator names its classes get Slicer's terminology and colors (core/anatomy.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from MedSegUNetLib.core.anatomy import known_labels
from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.importers.json_files import read_json_object
from MedSegUNetLib.model.bundle import IMAGE_AXES, BundleMeta, Normalization, Preprocessing, default_provenance
from MedSegUNetLib.model.network import NNUNET_CLASSES, NNUNET_LAYERS, NetworkSpec

CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
LICENCE_NAMES = ("license", "licence", "license.txt", "licence.txt", "license.md", "licence.md")


@dataclass
class NnUNetModel:
    """A trained-model folder, read: its plans, dataset description and the configuration to import."""

    folder: Path
    plans: Dict[str, Any]
    dataset: Dict[str, Any]
    trainer: str
    plans_name: str
    configuration_name: str

    @property
    def configuration(self) -> Dict[str, Any]:
        return resolved_configuration(self.plans, self.configuration_name, self.folder)


def is_model_folder(folder: Path) -> bool:
    return (folder / "plans.json").is_file() and (folder / "dataset.json").is_file()


def find_model_folder(root: Path) -> Path:
    """``root`` or the one folder below it (at most three levels) holding ``plans.json`` and ``dataset.json``."""
    if is_model_folder(root):
        return root
    found = sorted({plans.parent for plans in root.glob("**/plans.json") if is_model_folder(plans.parent)})
    found = [folder for folder in found if len(folder.relative_to(root).parts) <= 3]
    if not found:
        raise MedSegError("holds no nnU-Net trained model (a folder with plans.json and dataset.json)", root)
    if len(found) > 1:
        names = ", ".join(str(folder.relative_to(root)) for folder in found[:4])
        raise MedSegError(f"holds several nnU-Net trained models ({names}); give one of their folders", root)
    return found[0]


def read_model(folder: Path) -> NnUNetModel:
    """The folder's plans and dataset description; its name ``TRAINER__PLANS__CONFIGURATION`` when it has one."""
    plans, dataset = read_json_object(folder / "plans.json"), read_json_object(folder / "dataset.json")
    parts = folder.name.split("__")
    trainer, plans_name, configuration = parts if len(parts) == 3 else ("?", str(plans.get("plans_name", "?")), "")
    if not configuration:
        configurations = list(plans.get("configurations", {}))
        if len(configurations) != 1:
            raise MedSegError(
                f"the folder name does not say its configuration (TRAINER__PLANS__CONFIGURATION) and the plans "
                f"have {len(configurations)}",
                folder,
            )
        configuration = configurations[0]
    return NnUNetModel(folder, plans, dataset, trainer, plans_name, configuration)


def resolved_configuration(plans: Dict[str, Any], name: str, folder: Path) -> Dict[str, Any]:
    """The configuration with what it ``inherits_from`` filled in, as nnU-Net's plans manager resolves it."""
    configurations = plans.get("configurations", {})
    if name not in configurations:
        raise MedSegError(f"plans.json has no configuration '{name}' (it has {', '.join(configurations)})", folder)
    configuration = dict(configurations[name])
    seen = {name}
    while "inherits_from" in configuration:
        parent = configuration.pop("inherits_from")
        if parent in seen or parent not in configurations:
            raise MedSegError(f"configuration '{name}' inherits from a missing or circular '{parent}'", folder)
        seen.add(parent)
        configuration = {**configurations[parent], **configuration}
    return configuration


def available_folds(folder: Path, checkpoint: str) -> List[str]:
    """The fold names (``0``, ``1``, ..., ``all``) that have ``checkpoint``."""
    folds = [path.parent.name[len("fold_") :] for path in folder.glob(f"fold_*/{checkpoint}")]
    return sorted(folds, key=lambda fold: (not fold.isdigit(), int(fold) if fold.isdigit() else 0, fold))


def choose_folds(folder: Path, requested: Optional[Sequence[str]], checkpoint: str) -> List[str]:
    """The requested folds (all that have the checkpoint when ``requested`` is None or ``["all"]`` and no
    ``fold_all`` exists), each checked to exist."""
    present = available_folds(folder, checkpoint)
    if not present:
        raise MedSegError(f"has no fold_*/{checkpoint}", folder)
    if requested is None:
        return present
    missing = [fold for fold in requested if fold not in present]
    if missing:
        raise MedSegError(
            f"has no {checkpoint} for fold(s) {', '.join(missing)} (present: {', '.join(present)})", folder
        )
    return list(requested)


def labels_of(model: NnUNetModel) -> List[str]:
    """The label names in output-channel order (background excluded); region-based models are refused."""
    labels = model.dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise MedSegError("dataset.json has no 'labels'", model.folder / "dataset.json")
    if any(isinstance(value, (list, tuple)) for value in labels.values()) or "regions_class_order" in model.dataset:
        raise MedSegError(
            "is a region-based nnU-Net model (overlapping regions, sigmoid outputs); only label-based models "
            "can be imported",
            model.folder / "dataset.json",
        )
    values = {name: int(value) for name, value in labels.items() if name != "ignore"}
    ordered = sorted(values, key=lambda name: values[name])
    if [values[name] for name in ordered] != list(range(len(ordered))):
        raise MedSegError("dataset.json labels are not the consecutive values 0, 1, 2 ...", model.folder)
    return ordered[1:]


def channel_names(model: NnUNetModel) -> List[str]:
    channels = model.dataset.get("channel_names") or model.dataset.get("modality")
    if not isinstance(channels, dict) or not channels:
        raise MedSegError("dataset.json has no 'channel_names'", model.folder / "dataset.json")
    return [str(channels[key]) for key in sorted(channels, key=int)]


def _old_style_architecture(configuration: Dict[str, Any]) -> Dict[str, Any]:
    """The ``architecture`` entry that nnU-Net (2.4 and later) derives from plans written before it existed."""
    name = configuration.get("UNet_class_name")
    if name not in NNUNET_CLASSES:
        raise ValueError(f"network class '{name}' is not supported (known: {', '.join(NNUNET_CLASSES)})")
    stages = len(configuration["n_conv_per_stage_encoder"])
    base, widest = configuration["UNet_base_num_features"], configuration["unet_max_num_features"]
    blocks = "n_conv_per_stage" if name == "PlainConvUNet" else "n_blocks_per_stage"
    return {
        "network_class_name": name,
        "arch_kwargs": {
            "n_stages": stages,
            "features_per_stage": [min(base * 2**stage, widest) for stage in range(stages)],
            "conv_op": "Conv3d",
            "kernel_sizes": configuration["conv_kernel_sizes"],
            "strides": configuration["pool_op_kernel_sizes"],
            blocks: configuration["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": configuration["n_conv_per_stage_decoder"],
            "conv_bias": True,
            "norm_op": "InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
    }


def _layer_name(key: str, value: Any) -> Optional[str]:
    """``torch.nn.modules.conv.Conv3d`` -> ``Conv3d`` when allowed; anything outside torch.nn is refused."""
    if value is None:
        return None
    text = str(value)
    if "." in text and not text.startswith("torch.nn."):
        raise ValueError(f"{key} '{text}' is not a torch.nn layer")
    name = text.rsplit(".", 1)[-1]
    if name not in NNUNET_LAYERS[key]:
        raise ValueError(f"{key} '{text}' is not supported (known: {', '.join(NNUNET_LAYERS[key])})")
    return name


def network_spec(model: NnUNetModel, in_channels: int, classes: int, members: int) -> NetworkSpec:
    """The configuration's network as a spec the engine builds (``classes`` outputs, background included)."""
    configuration = model.configuration
    if len(configuration.get("patch_size", [])) != 3:
        raise MedSegError(
            f"configuration '{model.configuration_name}' is 2D; only 3D models can be imported", model.folder
        )
    try:
        architecture = configuration.get("architecture") or _old_style_architecture(configuration)
        class_name = str(architecture["network_class_name"]).rsplit(".", 1)[-1]
        if class_name not in NNUNET_CLASSES:
            raise ValueError(f"network class '{architecture['network_class_name']}' is not supported")
        args = dict(architecture["arch_kwargs"])
        for key in NNUNET_LAYERS:
            args[key] = _layer_name(key, args.get(key))
    except (KeyError, TypeError, ValueError) as error:
        raise MedSegError(f"cannot read the network from plans.json ({error})", model.folder / "plans.json") from None
    args.update(input_channels=in_channels, num_classes=classes)
    args.pop("deep_supervision", None)
    return NetworkSpec(class_name, json.loads(json.dumps(args)), members)


def normalization(model: NnUNetModel, channels: int) -> Normalization:
    """The plans' per-channel normalization as one engine normalization (channels that differ are refused)."""
    configuration = model.configuration
    schemes = list(configuration.get("normalization_schemes", []))
    masks = list(configuration.get("use_mask_for_norm", [False] * len(schemes)))
    if len(schemes) != channels:
        raise MedSegError(f"the plans name {len(schemes)} normalizations for {channels} channels", model.folder)
    made = [
        _channel_normalization(model, index, scheme, bool(mask))
        for index, (scheme, mask) in enumerate(zip(schemes, masks))
    ]
    if any(other != made[0] for other in made[1:]):
        raise MedSegError(
            f"the channels are normalized differently ({', '.join(schemes)}); only one normalization for all "
            "channels is supported",
            model.folder,
        )
    return made[0]


def _channel_normalization(model: NnUNetModel, channel: int, scheme: str, use_mask: bool) -> Normalization:
    if scheme == "CTNormalization":
        properties = model.plans.get("foreground_intensity_properties_per_channel", {}).get(str(channel))
        if not properties:
            raise MedSegError(f"plans.json has no foreground intensities for channel {channel}", model.folder)
        clip = (float(properties["percentile_00_5"]), float(properties["percentile_99_5"]))
        return Normalization("ct", clip, float(properties["mean"]), max(float(properties["std"]), 1e-8))
    if scheme == "ZScoreNormalization":
        return Normalization("zscore", None, nonzero=use_mask)
    if scheme == "NoNormalization":
        return Normalization("none", None)
    if scheme == "RescaleTo01Normalization":
        return Normalization("rescale", None)
    raise MedSegError(f"the plans name the normalization '{scheme}', which cannot be imported", model.folder)


def preprocessing(model: NnUNetModel, channels: int) -> Preprocessing:
    """Spacing and patch (nnU-Net's are in transposed (z, y, x) array order; a bundle's in (x, y, z)), the
    image's own axes permuted by ``transpose_forward``, and the normalization."""
    configuration = model.configuration
    transpose = tuple(int(a) for a in model.plans.get("transpose_forward", (0, 1, 2)))
    spacing = tuple(float(s) for s in configuration["spacing"])[::-1]
    patch = tuple(int(p) for p in configuration["patch_size"])[::-1]
    return Preprocessing(spacing, patch, IMAGE_AXES, normalization(model, channels), transpose)  # type: ignore[arg-type]


def licence_text(model: NnUNetModel, root: Path) -> Optional[str]:
    """A licence that came with the model: a LICENSE file in its folder or above it (within the source), or
    dataset.json's ``licence``/``license`` entry."""
    folder = model.folder
    while True:
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name.lower() in LICENCE_NAMES:
                return path.read_text(encoding="utf-8", errors="replace").strip()
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    entry = model.dataset.get("licence") or model.dataset.get("license")
    return str(entry) if entry else None


def bundle_meta(
    model: NnUNetModel,
    folds: Sequence[str],
    checkpoint: str,
    mirror_axes: Optional[Sequence[int]],
    trainer: str,
    name: str,
    licence: Optional[str],
) -> BundleMeta:
    """Everything but the weights: network, labels, channels, preprocessing, mirroring and provenance."""
    labels, channels = labels_of(model), channel_names(model)
    source: Dict[str, Any] = {
        "format": "nnU-Net v2",
        "dataset": str(model.dataset.get("name") or model.folder.parent.name),
        "trainer": trainer,
        "plans": model.plans_name,
        "configuration": model.configuration_name,
        "folds": list(folds),
        "checkpoint": checkpoint,
    }
    if licence:
        source["licence"] = licence
    meta = BundleMeta(
        network=network_spec(model, len(channels), len(labels) + 1, len(folds)),
        labels=known_labels(labels),  # well-known structure names get Slicer's terminology and colors
        channels=channels,
        preprocessing=preprocessing(model, len(channels)),
        provenance=default_provenance(source=source),
        name=name,
        mirror_axes=tuple(int(a) for a in mirror_axes) if mirror_axes else (),
        windows="nnunet",
        body_crop=False,
        restore="scores",
        padding="zero",  # nnU-Net's predictor pads a thin image to its whole patch with 0 (normalized units)
    )
    try:
        meta.validate()
    except ValueError as error:
        raise MedSegError(f"cannot be imported: {error}", model.folder) from None
    return meta


def network_weights(checkpoint: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """The checkpoint's ``network_weights``, checked to be names and tensors."""
    import torch

    weights = checkpoint.get("network_weights")
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise MedSegError("is not an nnU-Net checkpoint (no 'network_weights' of named tensors)", path)
    return weights


def mirroring_of(checkpoint: Dict[str, Any], path: Path) -> Tuple[int, ...]:
    """The checkpoint's ``inference_allowed_mirroring_axes`` (none allowed when it says None)."""
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    if axes is None:
        return ()
    if not isinstance(axes, (list, tuple)) or not all(isinstance(a, int) and 0 <= a <= 2 for a in axes):
        raise MedSegError(f"has bad inference_allowed_mirroring_axes {axes!r}", path)
    return tuple(axes)
