"""A model bundle's metadata in words and units, for the panel: one line, and the details on request.

Plain Python (no Qt, no MRML), so the same text is tested here and drawn by tools/draw_panel.py."""

from __future__ import annotations

from pathlib import Path
from typing import List

try:  # Slicer's translation function, as the module template uses it
    from slicer.i18n import tr as _
except ImportError:  # outside Slicer, and in Slicer releases without it (not in the 5.8.1/5.12.3 snapshots)

    def _(text: str) -> str:
        return text


MODEL_SET_SUFFIX = ".modelset.json"  # MedSegUNetLib.model.model_set.SUFFIX, spelled here to stay plain Python


def modelLabel(path: Path) -> str:
    """What the model list shows: the file name, or the folder's for a trained OUTDIR/model.safetensors,
    and for a model set its name with the number of models."""
    if path.name.lower().endswith(MODEL_SET_SUFFIX):
        return path.name[: -len(MODEL_SET_SUFFIX)]
    return path.parent.name if path.stem == "model" else path.stem


def modelSetText(name: str, metas: List, paths: List[Path]) -> str:
    """A model set as the panel describes a model: one line (its models' structures), then each model's
    own summary line and file."""
    count = sum(len(meta.labels) for meta in metas)
    summary = _("Set of {models} models, {count} structures: {names}").format(
        models=len(metas), count=count, names=", ".join(modelLabel(path) for path in paths)
    )
    lines = [_("Run as one: the input is read once; where two models label a voxel, the first listed keeps it.")]
    for index, (meta, path) in enumerate(zip(metas, paths), start=1):
        lines.append(f"{index}. {modelLabel(path)}: {modelSummary(meta, path)}")
        lines.append("   " + _("File: {path}").format(path=path))
    return summary + "\n" + "\n".join(lines)


SIDES = ("left", "right")


def plural(words: str) -> str:
    """'kidney' -> 'kidneys', 'artery' -> 'arteries'; names that an added s would garble keep their form."""
    if words.endswith(("s", "x", "z", "ch", "sh")):
        return _("left and right {structure}").format(structure=words)
    if words.endswith("y") and words[-2:-1] not in ("a", "e", "i", "o", "u", ""):
        return words[:-1] + "ies"
    return words + "s"


def structureGroups(names: List[str]) -> List[str]:
    """The structures for one line, in the model's order: spaces for underscores, a left/right pair as one
    plural ('kidney_left', 'kidney_right' -> 'kidneys')."""
    groups: dict = {}  # base name -> the sided names it stands for; a structure without a side has its own entry
    for name in names:
        words = name.replace("_", " ").split()
        if len(words) > 1 and words[-1].lower() in SIDES:
            key = " ".join(words[:-1])
        elif len(words) > 1 and words[0].lower() in SIDES:
            key = " ".join(words[1:])
        else:
            key = ("alone", name)  # a structure without a side is never merged
        groups.setdefault(key, []).append(name)
    return [plural(key) if len(members) > 1 else members[0].replace("_", " ") for key, members in groups.items()]


def millimetres(spacing) -> str:
    values = [f"{float(value):g}" for value in spacing]
    return f"{values[0]} mm" if len(set(values)) == 1 else " × ".join(values) + " mm"


def duration(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    if seconds < 60:
        return _("{seconds} s").format(seconds=int(round(seconds)))
    if minutes < 60:
        return _("{minutes} min").format(minutes=minutes)
    return _("{hours} h {minutes} min").format(hours=minutes // 60, minutes=minutes % 60)


def casesText(count: int) -> str:
    return _("1 case") if count == 1 else _("{count} cases").format(count=count)


def trainingOf(meta) -> dict:
    training = meta.provenance.get("training") if isinstance(meta.provenance, dict) else None
    return training if isinstance(training, dict) else {}


def modelSummary(meta, path: Path) -> str:
    """One line: '6 structures (spleen, kidneys, liver, …), 3 mm, trained on 1 case', after the model's own
    name ('abdomen-ct: ...') when the model list shows another one (a trained model-YYYYmmdd-HHMMSS)."""
    groups = structureGroups([label.name for label in meta.labels])
    listed = ", ".join(groups if len(groups) <= 4 else groups[:3] + ["…"])
    count = len(meta.labels)
    structures = _("1 structure ({names})") if count == 1 else _("{count} structures ({names})")
    parts = [structures.format(count=count, names=listed), millimetres(meta.preprocessing.target_spacing)]
    cases = trainingOf(meta).get("cases")
    if isinstance(cases, list):
        parts.append(_("trained on {cases}").format(cases=casesText(len(cases))))
    return ("" if meta.name == modelLabel(path) else f"{meta.name}: ") + ", ".join(parts)


def hausdorffText(value) -> str:
    if not isinstance(value, (int, float)):
        return _("not measured (a mask was empty)")
    return f"{round(value) if value >= 10 else round(value, 1):g} mm"


def validationLines(meta) -> List[str]:
    """Dice and 95% Hausdorff distance per structure, in words, from the bundle's validation metrics."""
    metrics = meta.provenance.get("metrics") if isinstance(meta.provenance, dict) else None
    if not isinstance(metrics, dict) or not metrics:
        return []
    left = dict(metrics)
    lines = []
    for label in meta.labels:
        dice, hd95 = left.pop(f"dice_{label.name}", None), left.pop(f"hd95_mm_{label.name}", None)
        if isinstance(dice, (int, float)):
            lines.append(
                "  "
                + _("{structure}: Dice {dice}, 95% Hausdorff {distance}").format(
                    structure=label.name, dice=f"{dice:.2f}", distance=hausdorffText(hd95)
                )
            )
    mean = left.pop("dice_mean", None)
    if isinstance(mean, (int, float)):
        lines.append("  " + _("mean Dice {dice}").format(dice=f"{mean:.2f}"))
    if left:
        lines.append("  " + _("also: {metrics}").format(metrics=", ".join(f"{k} {v}" for k, v in left.items())))
    training = trainingOf(meta)
    validated = training.get("validation")
    header = (
        _("Validation on {cases}, per structure:").format(cases=casesText(len(validated)))
        if isinstance(validated, list)
        else _("Validation, per structure:")
    )
    lines.insert(0, header)
    if training.get("split"):
        lines.append("  " + _("Note: {note}").format(note=training["split"]))
    return lines


LICENCE_SHOWN = 300  # characters of an imported model's licence text; `medsegunet info` shows it whole


def sourceLines(meta) -> List[str]:
    """Where an imported model came from (format, dataset, trainer, folds) and the start of its licence."""
    source = meta.provenance.get("source") if isinstance(meta.provenance, dict) else None
    if not isinstance(source, dict) or not source:
        return []
    facts = "; ".join(
        f"{key} {', '.join(map(str, value)) if isinstance(value, list) else value}"
        for key, value in source.items()
        if key not in ("format", "licence")
    )
    lines = [_("Imported from {format}: {facts}").format(format=source.get("format", "?"), facts=facts)]
    licence = " ".join(str(source.get("licence") or "").split())
    if licence:
        shown = licence if len(licence) <= LICENCE_SHOWN else licence[:LICENCE_SHOWN] + "…"
        lines.append(_("Licence of the source (it applies): {licence}").format(licence=shown))
    return lines


def modelDetails(meta, path: Path) -> str:
    """The model's details: every structure, the validation scores, the input it expects, its training."""
    prep, training = meta.preprocessing, trainingOf(meta)
    lines = [
        _("Structures: {names}").format(names=", ".join(label.name for label in meta.labels)),
        _("Input: {channels}, resampled to {spacing} ({orientation}), in windows of {patch} voxels").format(
            channels=", ".join(meta.channels),
            spacing=" × ".join(f"{float(s):g}" for s in prep.target_spacing) + " mm",
            orientation=prep.orientation,
            patch=" × ".join(str(p) for p in prep.patch_size),
        ),
    ]
    if isinstance(training.get("cases"), list):
        device = str(training.get("device", "?"))
        where = {"cpu": _("the CPU"), "mps": _("an Apple GPU")}.get(device, device)
        text = _("Trained on {cases}, {steps} steps on {device}").format(
            cases=casesText(len(training["cases"])), steps=training.get("steps", "?"), device=where
        )
        if isinstance(training.get("seconds"), (int, float)):
            text += _(", in {duration}").format(duration=duration(training["seconds"]))
        lines.append(text)
    lines += validationLines(meta)
    lines += sourceLines(meta)
    created = meta.provenance.get("created") if isinstance(meta.provenance, dict) else None
    if created:
        lines.append(
            _("Made {date} by MedSegUNet {version}, network {network}").format(
                date=str(created)[:10], version=meta.provenance.get("medsegunet_version", "?"), network=meta.network.cls
            )
        )
    lines.append(_("File: {path}").format(path=path))
    return "\n".join(lines)
