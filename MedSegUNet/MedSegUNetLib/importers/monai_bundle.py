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
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Tuple

from MedSegUNetLib.core.anatomy import known_labels
from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.importers.config_expressions import REFERENCE, NotPlainData, evaluate
from MedSegUNetLib.importers.json_files import read_json_object
from MedSegUNetLib.model.bundle import IMAGE_AXES, BundleMeta, Normalization, Preprocessing, default_provenance
from MedSegUNetLib.model.network import NetworkSpec

CONFIGS = ("inference.json", "inference.yaml", "inference.yml")
LICENCE_FILES = ("LICENSE", "LICENCE", "LICENSE.txt", "docs/data_license.txt")
# The MONAI network classes the engine builds, by the names a configuration may give them.
NETWORKS = {
    **dict.fromkeys(("UNet", "monai.networks.nets.UNet", "monai.networks.nets.unet.UNet"), "UNet"),
    **dict.fromkeys(("DynUNet", "monai.networks.nets.DynUNet", "monai.networks.nets.dynunet.DynUNet"), "DynUNet"),
    **dict.fromkeys(
        ("SegResNet", "monai.networks.nets.SegResNet", "monai.networks.nets.segresnet.SegResNet"), "SegResNet"
    ),
    **dict.fromkeys(
        ("BasicUNet", "monai.networks.nets.BasicUNet", "monai.networks.nets.basic_unet.BasicUNet"), "BasicUNet"
    ),
}
# Classes whose spatial_dims defaults to 3 in MONAI (the others must say it).
_THREE_D_BY_DEFAULT = ("SegResNet", "BasicUNet")
# Upsampling that mixes channels into positions in (x, y, z) order: no exact form on (z, y, x) arrays.
_AXIS_ORDERED_UPSAMPLING = {"SegResNet": "upsample_mode", "BasicUNet": "upsample"}
# Per network class: the arguments that hold one value per network level, each per axis (reversed for (z, y, x)),
# and those that hold one value per axis.
_PER_LEVEL = {
    "UNet": ("strides",),
    "DynUNet": ("kernel_size", "strides", "upsample_kernel_size"),
    "SegResNet": (),
    "BasicUNet": (),
}
_PER_AXIS = {"UNet": ("kernel_size", "up_kernel_size"), "DynUNet": (), "SegResNet": (), "BasicUNet": ()}
# Transforms that change nothing the engine has to reproduce (loading, channel and type bookkeeping).
NO_OPS = ("LoadImage", "EnsureChannelFirst", "EnsureType", "ToTensor", "AddChannel", "SaveImage")
PREPROCESSING = (
    "Orientation",
    "Spacing",
    "ScaleIntensityRange",
    "NormalizeIntensity",
    "ScaleIntensity",
    "CropForeground",
    *NO_OPS,
)
POSTPROCESSING = ("Activations", "AsDiscrete", "Invertd", *NO_OPS)
_PLAIN_REFERENCE = re.compile(rf"^{REFERENCE.pattern}$")
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
    settings: Dict[str, Any] = field(default_factory=dict)  # entries the user set, as MONAI's `run --ID VALUE`

    def resolve(self, value: Any, key: str, depth: int = 0, deep: bool = True) -> Any:
        """``value`` with its references resolved: ``@id`` (another entry of the configuration, ``#`` for
        nested ones) and ``$`` expressions of plain data (:mod:`config_expressions`). Any other expression
        or macro (``%...``) is refused: it would need Python evaluated. ``deep=False``: what is inside a list
        or mapping is left as it is."""
        if depth > _MAX_DEPTH:
            raise MedSegError(f"'{key}' has references nested too deeply", self.config_path)
        if isinstance(value, dict):
            return {k: self.resolve(v, f"{key}#{k}", depth + 1) for k, v in value.items()} if deep else value
        if isinstance(value, list):
            return [self.resolve(v, f"{key}#{i}", depth + 1) for i, v in enumerate(value)] if deep else value
        if not isinstance(value, str) or value[:1] not in ("@", "$", "%"):
            return value

        def lookup(path: str) -> Any:
            return self.resolve(self.entry(path, key), f"{key}->{path}", depth + 1, deep)

        match = _PLAIN_REFERENCE.match(value)
        if match is not None:
            return lookup(match.group(1))
        if value.startswith("$"):
            try:
                return evaluate(value[1:], lookup)
            except NotPlainData as reason:
                raise MedSegError(
                    f"'{key}' is the expression {value!r}, which is not evaluated ({reason}; only plain data, "
                    "@references, conditionals and + are read)",
                    self.config_path,
                ) from None
        raise MedSegError(f"'{key}' is the macro {value!r}, which is not read (only @references)", self.config_path)

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

    def set_entry(self, path: str, value: Any) -> None:
        """Set an entry the configuration has (a typo names nothing and is refused), as MONAI's runner
        overrides ``--ID VALUE``."""
        parent_path, _, last = re.sub("::", "#", path).rpartition("#")
        missing = MedSegError(f"--set {path}: the configuration has no such entry", self.config_path)
        try:
            parent = self.entry(parent_path, path) if parent_path else self.config
        except MedSegError:
            raise missing from None
        if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
            parent[int(last)] = value
        elif isinstance(parent, dict) and last in parent:
            parent[last] = value
        else:
            raise missing
        self.settings[path] = value


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


def read_bundle(folder: Path, settings: Optional[Dict[str, Any]] = None) -> MonaiBundle:
    """The bundle in ``folder``, with ``settings`` (entry id -> value) set in its configuration and its
    ``bundle_root`` the folder itself (as MONAI's runner sets it), so paths are read inside it."""
    config_path = next(folder / "configs" / name for name in CONFIGS if (folder / "configs" / name).is_file())
    bundle = MonaiBundle(
        folder, config_path, _read_config(config_path), read_json_object(folder / "configs" / "metadata.json")
    )
    if "bundle_root" in bundle.config:
        bundle.config["bundle_root"] = "."
    for path, value in (settings or {}).items():
        bundle.set_entry(path, value)
    return bundle


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
    "ScaleIntensity": ("minv", "maxv", "factor", "channel_wise"),
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
    # intensity transforms with statistics over all channels at once (the engine's are per channel)
    across_channels: List[str] = field(default_factory=list)


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
        elif base == "ScaleIntensity":
            prep.normalization, intensity_seen = _then_rescale(bundle, key, args, prep.normalization), True
        elif base == "CropForeground":
            bundle.notes.append(
                "CropForegroundd: the engine runs its windows over the whole image, not on MONAI's foreground "
                "crop; window positions and so a few boundary voxels may differ"
            )
        if base in ("NormalizeIntensity", "ScaleIntensity") and not args.get("channel_wise", False):
            prep.across_channels.append(name)
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


def _then_rescale(bundle: MonaiBundle, key: str, args: Dict[str, Any], before: Normalization) -> Normalization:
    """ScaleIntensity minv..maxv: the image's minimum..maximum to that range, after whatever came before."""
    if before.rescale_to is not None:
        raise MedSegError(f"'{key}' is a second ScaleIntensityd; only one is supported", bundle.config_path)
    if args.get("factor") is not None:
        raise MedSegError(f"'{key}' ScaleIntensityd with a factor is not supported", bundle.config_path)
    low, high = _number(args, "minv", key, bundle, 0.0), _number(args, "maxv", key, bundle, 1.0)
    return replace(before, rescale_to=(low, high))


def _refuse_second_intensity(bundle: MonaiBundle, key: str) -> None:
    raise MedSegError(
        f"'{key}' is a second intensity transform; only one (then ScaleIntensityd) is supported", bundle.config_path
    )


def _scale_range(bundle: MonaiBundle, key: str, args: Dict[str, Any], seen: bool) -> Normalization:
    """ScaleIntensityRange a_min..a_max -> b_min..b_max, as the engine's ``ct`` normalization: clip, then
    (x - mean) / std with mean = a_min - b_min * std and std = (a_max - a_min) / (b_max - b_min)."""
    if seen:
        _refuse_second_intensity(bundle, key)
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
        _refuse_second_intensity(bundle, key)
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
    padding: str  # BundleMeta.padding: how a volume thinner than the window is padded


# The SlidingWindowInferer arguments read (the others, e.g. its device, stay unread and unevaluated).
_INFERER_ARGS = ("roi_size", "overlap", "mode", "sigma_scale", "sw_batch_size", "padding_mode", "cval")
# MONAI's padding modes the engine pads with, as BundleMeta.padding names them.
_PADDINGS = {"constant": "zero", "replicate": "replicate"}


def inferer_of(bundle: MonaiBundle) -> Inferer:
    """The SlidingWindowInferer's window (MONAI's (x, y, z) array order), overlap, blending and padding."""
    if "inferer" not in bundle.config:
        raise MedSegError("has no 'inferer'", bundle.config_path)
    inferer = bundle.resolve(bundle.config["inferer"], "inferer", deep=False)
    name = _class_name(inferer.get("_target_") if isinstance(inferer, dict) else inferer)
    if name != "SlidingWindowInferer" or not isinstance(inferer, dict):
        raise MedSegError(f"the inferer '{name}' is not supported (only SlidingWindowInferer)", bundle.config_path)
    inferer = {k: bundle.resolve(v, f"inferer#{k}") for k, v in inferer.items() if k in _INFERER_ARGS}
    roi = inferer.get("roi_size")
    roi = [roi] * 3 if isinstance(roi, int) else roi
    if not isinstance(roi, list) or len(roi) != 3 or not all(isinstance(r, int) and r > 0 for r in roi):
        raise MedSegError(f"'inferer' roi_size {inferer.get('roi_size')!r} is not three sizes", bundle.config_path)
    blend = str(inferer.get("mode", "constant"))
    if blend not in ("constant", "gaussian"):
        raise MedSegError(f"'inferer' mode '{blend}' is not supported (constant, gaussian)", bundle.config_path)
    if blend == "gaussian" and float(inferer.get("sigma_scale", 0.125)) != 0.125:
        raise MedSegError("'inferer' sigma_scale other than 0.125 is not supported", bundle.config_path)
    padding = str(inferer.get("padding_mode", "constant"))
    if padding not in _PADDINGS or _number(inferer, "cval", "inferer", bundle, 0.0) != 0.0:
        raise MedSegError(
            f"'inferer' padding_mode '{padding}' (cval {inferer.get('cval', 0.0)}) is not supported "
            "(constant with cval 0, replicate)",
            bundle.config_path,
        )
    overlap = _number(inferer, "overlap", "inferer", bundle, 0.25)  # MONAI's default
    batch = int(_number(inferer, "sw_batch_size", "inferer", bundle, 1))
    return Inferer((int(roi[0]), int(roi[1]), int(roi[2])), overlap, blend, batch, _PADDINGS[padding])


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
            f"'network_def' _target_ '{target}' is not a supported network "
            f"(supported: {', '.join(sorted(set(NETWORKS.values())))})",
            bundle.config_path,
        )
    cls = NETWORKS[target]
    args = {k: v for k, v in definition.items() if not k.startswith("_")}
    if args.get("spatial_dims", args.get("dimensions", 3 if cls in _THREE_D_BY_DEFAULT else None)) != 3:
        raise MedSegError("'network_def' is not a 3D network (spatial_dims 3)", bundle.config_path)
    upsampling = _AXIS_ORDERED_UPSAMPLING.get(cls)
    if upsampling and str(args.get(upsampling, "")).lower() == "pixelshuffle":
        raise MedSegError(
            f"'network_def' {cls} with {upsampling} 'pixelshuffle' is not supported (its channels are ordered by "
            "MONAI's axes)",
            bundle.config_path,
        )
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
    if network.in_channels > 1 and prep.across_channels:
        raise MedSegError(
            f"{', '.join(prep.across_channels)} computes its statistics over all {network.in_channels} channels at "
            "once (channel_wise false); only per-channel intensities are supported",
            bundle.config_path,
        )
    pairs = ("LR", "AP", "IS")
    if prep.orientation != IMAGE_AXES and sorted(p for c in prep.orientation for p in pairs if c in p) != sorted(pairs):
        raise MedSegError(f"Orientationd axcodes '{prep.orientation}' is not an orientation", bundle.config_path)
    source: Dict[str, Any] = {
        "format": "monai-bundle",
        "bundle": str(bundle.metadata.get("name") or bundle.folder.name),
        "version": str(bundle.metadata.get("version", "?")),
        **(
            {"settings": ", ".join(f"{k}={json.dumps(v)}" for k, v in bundle.settings.items())}
            if bundle.settings
            else {}
        ),
        "inferer": f"roi {'x'.join(map(str, inferer.roi_size))}, overlap {inferer.overlap:g}, {inferer.blend}, "
        f"sw_batch_size {inferer.sw_batch_size}, padding {inferer.padding}",
    }
    licence = licence_text(bundle)
    if licence:
        source["licence"] = licence
    assert prep.spacing is not None  # preprocessing_of refuses a bundle without Spacingd
    meta = BundleMeta(
        network=network,
        labels=known_labels(labels),  # well-known structure names get Slicer's terminology and colors
        channels=channels_of(bundle, network.in_channels),
        preprocessing=Preprocessing(
            prep.spacing,
            inferer.roi_size,
            prep.orientation,
            prep.normalization,
            grid="centres",  # MONAI's Spacing
        ),
        provenance=default_provenance(source=source),
        name=name,
        restore=restore,
        blend=inferer.blend,
        padding=inferer.padding,
        body_crop=False,
        overlap=inferer.overlap,
    )
    try:
        meta.validate()
    except ValueError as error:
        raise MedSegError(f"cannot be imported: {error}", bundle.folder) from None
    return meta, inferer


def weights_path(bundle: MonaiBundle) -> Path:
    """The weights MONAI's CheckpointLoader reads (its ``load_path``, with ``bundle_root`` the bundle's
    folder), else ``models/model.pt``; always a file inside the bundle."""
    load_path = _checkpoint_load_path(bundle)
    if load_path is None:
        return bundle.folder / "models" / "model.pt"
    relative = PurePosixPath(load_path)
    inside = bundle.folder.resolve()
    path = (bundle.folder / relative).resolve()
    if relative.is_absolute() or (path != inside and inside not in path.parents):
        raise MedSegError(f"CheckpointLoader load_path '{load_path}' is outside the bundle", bundle.config_path)
    return bundle.folder / relative


def _checkpoint_load_path(bundle: MonaiBundle) -> Optional[str]:
    """The ``load_path`` of the configuration's first CheckpointLoader (a top-level entry or one of a list's,
    as the Model Zoo's ``checkpointloader`` and ``handlers`` are), relative to the bundle; None when none."""
    for key, value in bundle.config.items():
        for index, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, dict) and _class_name(item.get("_target_")) == "CheckpointLoader":
                where = f"{key}#{index}" if isinstance(value, list) else key
                try:
                    path = bundle.resolve(item.get("load_path"), f"{where}#load_path")
                except MedSegError as error:
                    bundle.notes.append(f"{error.message}: models/model.pt is read instead")
                    return None
                if not isinstance(path, str):
                    raise MedSegError(f"'{where}#load_path' is not a path", bundle.config_path)
                return path
    return None


def model_weights(bundle: MonaiBundle, path: Path) -> Dict[str, Any]:
    """The weights at ``path`` (:func:`weights_path`) read without unpickling code: a state dict, or one under
    ``model``/``state_dict``. Conv kernels are transposed to (z, y, x): their last three axes reversed."""
    import torch

    from MedSegUNetLib.importers.checkpoint import read_checkpoint

    if path.suffix == ".ts" or (not path.is_file() and path.with_suffix(".ts").is_file()):
        raise MedSegError(
            f"holds only a TorchScript model ({path.with_suffix('.ts').name}), which is code and is not imported; "
            "a state dict (.pt) is needed",
            bundle.folder,
        )
    if not path.is_file():
        raise MedSegError(f"has no {path.relative_to(bundle.folder).as_posix()}", bundle.folder)
    loaded = read_checkpoint(path)
    for key in ("model", "state_dict", "network"):
        if isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not loaded or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise MedSegError("is not a state dict (names and tensors)", path)
    return {k: v.permute(0, 1, 4, 3, 2).contiguous() if v.dim() == 5 else v for k, v in loaded.items()}
