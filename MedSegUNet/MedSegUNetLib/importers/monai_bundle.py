"""MONAI bundles (``configs/inference.json`` or ``.yaml``, ``configs/metadata.json``, ``models/model.pt``) turned
into a bundle description and weights, by reading the configuration as data: nothing in it is evaluated.

What MONAI's bundle inference does, carried over: the network of ``network_def`` (a class from
:data:`NETWORKS`), the preprocessing transforms that have an engine equivalent (:data:`PREPROCESSING`), the
SlidingWindowInferer's window, overlap and blending, the post-processing checked to be softmax/argmax (with
Invertd: the scores put back before the argmax), the labels of ``metadata.json``. Anything else that would
change the intensities, the geometry or the labels is refused with its name.

MONAI runs its networks on (C, X, Y, Z) arrays, the engine on (C, Z, Y, X): the same network runs on the
transposed array with its convolution kernels and per-axis arguments transposed (an exact re-indexing).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.core.labels import default_labels
from MedSegUNetLib.importers.json_files import read_json_object
from MedSegUNetLib.model.bundle import IMAGE_AXES, BundleMeta, Normalization, Preprocessing, default_provenance
from MedSegUNetLib.model.network import NetworkSpec

CONFIGS = ("inference.json", "inference.yaml", "inference.yml")
LICENCE_FILES = ("LICENSE", "LICENCE", "LICENSE.txt", "docs/data_license.txt")
# The MONAI network classes the engine builds, by the names a configuration may give them.
NETWORKS = {
    **dict.fromkeys(("UNet", "monai.networks.nets.UNet", "monai.networks.nets.unet.UNet"), "UNet"),
    **dict.fromkeys(("DynUNet", "monai.networks.nets.DynUNet", "monai.networks.nets.dynunet.DynUNet"), "DynUNet"),
}
# Per network class: the arguments that hold one value per network level, each per axis (reversed for (z, y, x)),
# and those that hold one value per axis.
_PER_LEVEL = {"UNet": ("strides",), "DynUNet": ("kernel_size", "strides", "upsample_kernel_size")}
_PER_AXIS = {"UNet": ("kernel_size", "up_kernel_size"), "DynUNet": ()}
# Transforms that change nothing the engine has to reproduce (loading, channel and type bookkeeping).
NO_OPS = ("LoadImage", "EnsureChannelFirst", "EnsureType", "ToTensor", "AddChannel", "SaveImage")
PREPROCESSING = ("Orientation", "Spacing", "ScaleIntensityRange", "NormalizeIntensity", "CropForeground", *NO_OPS)
POSTPROCESSING = ("Activations", "AsDiscrete", "Invertd", *NO_OPS)
_PLAIN_REFERENCE = re.compile(r"^@([A-Za-z_][A-Za-z0-9_]*(?:(?:#|::)[A-Za-z0-9_]+)*)$")
_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
_MAX_DEPTH = 20


def is_bundle_folder(folder: Path) -> bool:
    configs = folder / "configs"
    return (configs / "metadata.json").is_file() and any((configs / name).is_file() for name in CONFIGS)


def find_bundle_folder(root: Path) -> Optional[Path]:
    """``root`` or the one folder below it (at most two levels) laid out as a MONAI bundle; None when none is."""
    if is_bundle_folder(root):
        return root
    found = sorted(
        {p.parent.parent for p in root.glob("**/configs/metadata.json") if is_bundle_folder(p.parent.parent)}
    )
    found = [folder for folder in found if len(folder.relative_to(root).parts) <= 2]
    if len(found) > 1:
        names = ", ".join(str(folder.relative_to(root)) for folder in found[:4])
        raise MedSegError(f"holds several MONAI bundles ({names}); give one of their folders", root)
    return found[0] if found else None


@dataclass
class MonaiBundle:
    """A bundle folder, read: its inference configuration (as data) and metadata."""

    folder: Path
    config_path: Path
    config: Dict[str, Any]
    metadata: Dict[str, Any]
    notes: List[str] = field(default_factory=list)  # what was translated approximately, said at import

    def resolve(self, value: Any, key: str, depth: int = 0, deep: bool = True) -> Any:
        """``value`` with its plain references resolved: ``@id`` (another entry of the configuration, ``#``
        for nested ones) and ``$`` followed by a number or a plain reference. Any other expression or macro
        (``$...``, ``%...``) is refused: it would need Python evaluated. ``deep=False``: what is inside a list
        or mapping is left as it is."""
        if depth > _MAX_DEPTH:
            raise MedSegError(f"'{key}' has references nested too deeply", self.config_path)
        if isinstance(value, dict):
            return {k: self.resolve(v, f"{key}#{k}", depth + 1) for k, v in value.items()} if deep else value
        if isinstance(value, list):
            return [self.resolve(v, f"{key}#{i}", depth + 1) for i, v in enumerate(value)] if deep else value
        if not isinstance(value, str) or value[:1] not in ("@", "$", "%"):
            return value
        text = value[1:].strip() if value.startswith("$") else value
        if value.startswith("$") and _NUMBER.match(text):
            return float(text) if any(c in text for c in ".eE") else int(text)
        match = _PLAIN_REFERENCE.match(text)
        if match is None:
            raise MedSegError(
                f"'{key}' is the expression {value!r}, which is not evaluated (only numbers and @references are read)",
                self.config_path,
            )
        return self.resolve(self.entry(match.group(1), key), f"{key}->{match.group(1)}", depth + 1, deep)

    def entry(self, path: str, key: str) -> Any:
        current: Any = self.config
        for part in re.split(r"#|::", path):
            if isinstance(current, list) and part.isdigit() and int(part) < len(current):
                current = current[int(part)]
            elif isinstance(current, dict) and part in current:
                current = current[part]
            else:
                raise MedSegError(
                    f"'{key}' refers to '@{path}', which the configuration does not have", self.config_path
                )
        return current


def _read_config(path: Path) -> Dict[str, Any]:
    if path.suffix == ".json":
        return read_json_object(path)
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # safe_load: plain YAML, no Python objects
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        detail = " ".join(str(error).split())
        raise MedSegError(f"is not readable YAML ({detail})", path) from None
    if not isinstance(data, dict):
        raise MedSegError("does not hold a mapping", path)
    return data


def read_bundle(folder: Path) -> MonaiBundle:
    config_path = next(folder / "configs" / name for name in CONFIGS if (folder / "configs" / name).is_file())
    return MonaiBundle(
        folder, config_path, _read_config(config_path), read_json_object(folder / "configs" / "metadata.json")
    )


def _class_name(target: Any) -> str:
    """A transform's or network's ``_target_`` without MONAI's module path."""
    text = str(target)
    for prefix in ("monai.transforms.", "monai.networks.nets.", "monai.inferers."):
        if text.startswith(prefix):
            text = text.rsplit(".", 1)[-1]
    return text


# The arguments read of each transform (the others, e.g. SaveImaged's output_dir, stay unread and unevaluated).
_READ_ARGS = {
    "Orientation": ("axcodes",),
    "Spacing": ("pixdim", "mode"),
    "ScaleIntensityRange": ("a_min", "a_max", "b_min", "b_max", "clip"),
    "NormalizeIntensity": ("nonzero", "subtrahend", "divisor", "channel_wise"),
    "Activations": ("sigmoid", "softmax", "other"),
    "AsDiscrete": ("argmax", "threshold", "to_onehot", "rounding"),
}


def _transforms(bundle: MonaiBundle, key: str) -> List[Tuple[str, str, Dict[str, Any]]]:
    """The (class name without ``d``, class name, read arguments) of the Compose at ``key`` (``preprocessing``,
    ``postprocessing``); only the arguments in :data:`_READ_ARGS` are resolved."""
    if key not in bundle.config:
        return []
    compose = bundle.resolve(bundle.config[key], key, deep=False)
    if isinstance(compose, dict) and _class_name(compose.get("_target_")) == "Compose":
        compose = bundle.resolve(compose.get("transforms"), f"{key}#transforms", deep=False)
    if not isinstance(compose, list):
        raise MedSegError(f"'{key}' is not a Compose of transforms", bundle.config_path)
    read = []
    for index, item in enumerate(compose):
        where = f"{key}#transforms#{index}"
        transform = bundle.resolve(item, where, deep=False)
        if not isinstance(transform, dict) or "_target_" not in transform:
            raise MedSegError(f"'{where}' is not a transform with a _target_", bundle.config_path)
        name = _class_name(transform["_target_"])
        base = _base(name)
        wanted = [name for name in _READ_ARGS.get(base, ()) if name in transform]
        read.append((base, name, {arg: bundle.resolve(transform[arg], f"{where}#{arg}") for arg in wanted}))
    return read


def _base(name: str) -> str:
    """``Orientationd`` -> ``Orientation``: the dictionary transforms and the array ones take the same arguments."""
    return name[:-1] if name.endswith("d") and name not in ("Invertd",) else name


def _number(args: Dict[str, Any], name: str, key: str, bundle: MonaiBundle, default: Any = None) -> float:
    value = args.get(name, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise MedSegError(f"'{key}' {name} is {value!r}, not a number", bundle.config_path)
    return float(value)


@dataclass
class _Prep:
    orientation: str = IMAGE_AXES
    spacing: Optional[Tuple[float, float, float]] = None
    normalization: Normalization = field(default_factory=lambda: Normalization("none", None))


def preprocessing_of(bundle: MonaiBundle) -> _Prep:
    """Orientation, spacing and normalization from the preprocessing transforms; others refused by name."""
    prep = _Prep()
    intensity_seen = False
    for index, (base, name, args) in enumerate(_transforms(bundle, "preprocessing")):
        key = f"preprocessing#transforms#{index}"
        if base not in PREPROCESSING:
            raise MedSegError(
                f"the preprocessing transform '{name}' ({key}) has no engine equivalent; the bundle is not imported",
                bundle.config_path,
            )
        if base == "Orientation":
            if prep.spacing is not None:
                raise MedSegError(f"'{key}' Orientationd comes after Spacingd; not supported", bundle.config_path)
            prep.orientation = str(args.get("axcodes", "")).upper()
            if len(prep.orientation) != 3:
                raise MedSegError(f"'{key}' axcodes {args.get('axcodes')!r} is not a 3-letter code", bundle.config_path)
        elif base == "Spacing":
            prep.spacing = _spacing(bundle, key, args)
        elif base == "ScaleIntensityRange":
            prep.normalization, intensity_seen = _scale_range(bundle, key, args, intensity_seen), True
        elif base == "NormalizeIntensity":
            prep.normalization, intensity_seen = _zscore(bundle, key, args, intensity_seen), True
        elif base == "CropForeground":
            bundle.notes.append(
                "CropForegroundd: the engine runs its windows over the whole image, not on MONAI's foreground "
                "crop; window positions and so a few boundary voxels may differ"
            )
    if prep.spacing is None:
        raise MedSegError(
            "the preprocessing has no Spacingd (the network would run at each image's own voxel size); not supported",
            bundle.config_path,
        )
    return prep


def _spacing(bundle: MonaiBundle, key: str, args: Dict[str, Any]) -> Tuple[float, float, float]:
    pixdim = args.get("pixdim")
    pixdim = [pixdim] * 3 if isinstance(pixdim, (int, float)) else pixdim
    if (
        not isinstance(pixdim, list)
        or len(pixdim) != 3
        or not all(isinstance(p, (int, float)) and p > 0 for p in pixdim)
    ):
        raise MedSegError(f"'{key}' pixdim {args.get('pixdim')!r} is not three positive numbers", bundle.config_path)
    mode = args.get("mode", "bilinear")
    mode = mode[0] if isinstance(mode, list) and mode else mode
    if mode not in ("bilinear", 1, "linear"):
        raise MedSegError(
            f"'{key}' resamples the image with mode {mode!r}; only bilinear is supported", bundle.config_path
        )
    return float(pixdim[0]), float(pixdim[1]), float(pixdim[2])


def _scale_range(bundle: MonaiBundle, key: str, args: Dict[str, Any], seen: bool) -> Normalization:
    """ScaleIntensityRange a_min..a_max -> b_min..b_max, as the engine's ``ct`` normalization: clip, then
    (x - mean) / std with mean = a_min - b_min * std and std = (a_max - a_min) / (b_max - b_min)."""
    if seen:
        raise MedSegError(f"'{key}' is a second intensity transform; only one is supported", bundle.config_path)
    a_min, a_max = _number(args, "a_min", key, bundle), _number(args, "a_max", key, bundle)
    b_min, b_max = _number(args, "b_min", key, bundle), _number(args, "b_max", key, bundle)
    if a_max <= a_min or b_max <= b_min:
        raise MedSegError(f"'{key}' needs a_min < a_max and b_min < b_max", bundle.config_path)
    std = (a_max - a_min) / (b_max - b_min)
    # without clip: a window no CT value reaches (float32's range), so that clipping changes nothing
    clip = (a_min, a_max) if args.get("clip", False) else (-3.0e38, 3.0e38)
    return Normalization("ct", clip, a_min - b_min * std, std)


def _zscore(bundle: MonaiBundle, key: str, args: Dict[str, Any], seen: bool) -> Normalization:
    if seen:
        raise MedSegError(f"'{key}' is a second intensity transform; only one is supported", bundle.config_path)
    if args.get("subtrahend") is not None or args.get("divisor") is not None:
        raise MedSegError(
            f"'{key}' NormalizeIntensityd with a fixed subtrahend/divisor is not supported", bundle.config_path
        )
    return Normalization("zscore", None, nonzero=bool(args.get("nonzero", False)))


@dataclass
class Inferer:
    roi_size: Tuple[int, int, int]
    overlap: float
    blend: str
    sw_batch_size: int


def inferer_of(bundle: MonaiBundle) -> Inferer:
    """The SlidingWindowInferer's window (MONAI's (x, y, z) array order), overlap and blending."""
    if "inferer" not in bundle.config:
        raise MedSegError("has no 'inferer'", bundle.config_path)
    inferer = bundle.resolve(bundle.config["inferer"], "inferer")
    name = _class_name(inferer.get("_target_") if isinstance(inferer, dict) else inferer)
    if name != "SlidingWindowInferer" or not isinstance(inferer, dict):
        raise MedSegError(f"the inferer '{name}' is not supported (only SlidingWindowInferer)", bundle.config_path)
    roi = inferer.get("roi_size")
    roi = [roi] * 3 if isinstance(roi, int) else roi
    if not isinstance(roi, list) or len(roi) != 3 or not all(isinstance(r, int) and r > 0 for r in roi):
        raise MedSegError(f"'inferer' roi_size {inferer.get('roi_size')!r} is not three sizes", bundle.config_path)
    blend = str(inferer.get("mode", "constant"))
    if blend not in ("constant", "gaussian"):
        raise MedSegError(f"'inferer' mode '{blend}' is not supported (constant, gaussian)", bundle.config_path)
    if blend == "gaussian" and float(inferer.get("sigma_scale", 0.125)) != 0.125:
        raise MedSegError("'inferer' sigma_scale other than 0.125 is not supported", bundle.config_path)
    overlap = _number(inferer, "overlap", "inferer", bundle, 0.25)  # MONAI's default
    batch = int(inferer.get("sw_batch_size", 1))
    return Inferer((int(roi[0]), int(roi[1]), int(roi[2])), overlap, blend, batch)


def restore_of(bundle: MonaiBundle) -> str:
    """``scores`` when Invertd puts the probabilities back before the argmax, else ``labels``; the
    post-processing must end in one label per voxel (softmax or none, then argmax)."""
    invert_first, argmax = False, False
    for index, (base, name, args) in enumerate(_transforms(bundle, "postprocessing")):
        key = f"postprocessing#transforms#{index}"
        if base not in POSTPROCESSING:
            raise MedSegError(
                f"the postprocessing transform '{name}' ({key}) has no engine equivalent; the bundle is not imported",
                bundle.config_path,
            )
        if base == "Activations" and (args.get("sigmoid") or args.get("other") or not args.get("softmax", False)):
            raise MedSegError(f"'{key}' is not a softmax; only softmax then argmax is supported", bundle.config_path)
        if base == "AsDiscrete":
            if not args.get("argmax") or any(args.get(k) is not None for k in ("threshold", "to_onehot", "rounding")):
                raise MedSegError(f"'{key}' is not a plain argmax; only argmax is supported", bundle.config_path)
            argmax = True
        if base == "Invertd" and not argmax:
            invert_first = True
    if not argmax:
        raise MedSegError(
            "the postprocessing has no AsDiscreted argmax; only label outputs are supported", bundle.config_path
        )
    return "scores" if invert_first else "labels"


def labels_of(bundle: MonaiBundle, classes: int) -> List[str]:
    """``network_data_format.outputs.pred.channel_def`` as the Model Zoo writes it: {"0": "background", ...}."""
    path = bundle.folder / "configs" / "metadata.json"
    try:
        channels = bundle.metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
        names = {int(k): str(v) for k, v in channels.items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise MedSegError("has no network_data_format.outputs.pred.channel_def", path) from None
    if sorted(names) != list(range(classes)):
        raise MedSegError(f"channel_def names channels {sorted(names)}, the network has {classes} outputs", path)
    return [names[index] for index in range(1, classes)]


def channels_of(bundle: MonaiBundle, count: int) -> List[str]:
    image = bundle.metadata.get("network_data_format", {}).get("inputs", {}).get("image", {})
    modality = str(image.get("modality", "image")) if isinstance(image, dict) else "image"
    return [modality] if count == 1 else [f"{modality} {index}" for index in range(count)]


def network_spec(bundle: MonaiBundle) -> NetworkSpec:
    """``network_def`` as an engine spec, its per-axis arguments in (z, y, x) order."""
    if "network_def" not in bundle.config:
        raise MedSegError("has no 'network_def'", bundle.config_path)
    definition = bundle.resolve(bundle.config["network_def"], "network_def")
    if not isinstance(definition, dict) or "_target_" not in definition:
        raise MedSegError("'network_def' is not a network with a _target_", bundle.config_path)
    target = str(definition["_target_"])
    if target not in NETWORKS:
        raise MedSegError(
            f"'network_def' _target_ '{target}' is not a supported network (supported: UNet, DynUNet)",
            bundle.config_path,
        )
    cls = NETWORKS[target]
    args = {k: v for k, v in definition.items() if not k.startswith("_")}
    if args.get("spatial_dims", args.get("dimensions")) != 3:
        raise MedSegError("'network_def' is not a 3D network (spatial_dims 3)", bundle.config_path)
    for key in _PER_LEVEL[cls]:
        if isinstance(args.get(key), list):
            args[key] = [v[::-1] if isinstance(v, list) else v for v in args[key]]
    for key in _PER_AXIS[cls]:
        if isinstance(args.get(key), list):
            args[key] = args[key][::-1]
    return NetworkSpec(cls, json.loads(json.dumps(args)))


def licence_text(bundle: MonaiBundle) -> Optional[str]:
    """The bundle's LICENSE (or docs/data_license.txt), else metadata.json's ``license``."""
    texts = []
    for name in LICENCE_FILES:
        path = bundle.folder / name
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8", errors="replace").strip())
    entry = bundle.metadata.get("license") or bundle.metadata.get("licence")
    if not texts and entry:
        texts.append(str(entry))
    return "\n\n".join(texts) or None


def bundle_meta(bundle: MonaiBundle, name: str) -> Tuple[BundleMeta, Inferer]:
    """Everything but the weights, and the inferer's settings (its overlap is the segment default's to match)."""
    network = network_spec(bundle)
    labels = labels_of(bundle, network.out_channels)
    prep, inferer, restore = preprocessing_of(bundle), inferer_of(bundle), restore_of(bundle)
    pairs = ("LR", "AP", "IS")
    if prep.orientation != IMAGE_AXES and sorted(p for c in prep.orientation for p in pairs if c in p) != sorted(pairs):
        raise MedSegError(f"Orientationd axcodes '{prep.orientation}' is not an orientation", bundle.config_path)
    source: Dict[str, Any] = {
        "format": "monai-bundle",
        "bundle": str(bundle.metadata.get("name") or bundle.folder.name),
        "version": str(bundle.metadata.get("version", "?")),
        "inferer": f"roi {'x'.join(map(str, inferer.roi_size))}, overlap {inferer.overlap:g}, {inferer.blend}, "
        f"sw_batch_size {inferer.sw_batch_size}",
    }
    licence = licence_text(bundle)
    if licence:
        source["licence"] = licence
    assert prep.spacing is not None  # preprocessing_of refuses a bundle without Spacingd
    meta = BundleMeta(
        network=network,
        labels=default_labels(labels),
        channels=channels_of(bundle, network.in_channels),
        preprocessing=Preprocessing(prep.spacing, inferer.roi_size, prep.orientation, prep.normalization),
        provenance=default_provenance(source=source),
        name=name,
        restore=restore,
        blend=inferer.blend,
        body_crop=False,
        overlap=inferer.overlap,
    )
    try:
        meta.validate()
    except ValueError as error:
        raise MedSegError(f"cannot be imported: {error}", bundle.folder) from None
    return meta, inferer


def model_weights(bundle: MonaiBundle) -> Dict[str, Any]:
    """``models/model.pt`` read without unpickling code: a state dict, or one under ``model``/``state_dict``.
    Conv kernels are transposed to (z, y, x): their last three axes reversed."""
    import torch

    from MedSegUNetLib.importers.checkpoint import read_checkpoint

    path = bundle.folder / "models" / "model.pt"
    if not path.is_file():
        if (bundle.folder / "models" / "model.ts").is_file():
            raise MedSegError(
                "holds only a TorchScript model (models/model.ts), which is code and is not imported; "
                "a models/model.pt state dict is needed",
                bundle.folder,
            )
        raise MedSegError("has no models/model.pt", bundle.folder)
    loaded = read_checkpoint(path)
    for key in ("model", "state_dict", "network"):
        if isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not loaded or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise MedSegError("is not a state dict (names and tensors)", path)
    return {k: v.permute(0, 1, 4, 3, 2).contiguous() if v.dim() == 5 else v for k, v in loaded.items()}
