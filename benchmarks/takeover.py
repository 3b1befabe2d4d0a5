"""What Slicer's main thread spends taking over a Segment result, on Slicer's own MRML (slicer-core).

    python benchmarks/takeover.py [--quick] [--repeats N] [--json FILE]

The panel's take-over (MedSegUNetMRML.segments.take_over_result) reads the engine's .seg.nrrd into the
output node (a new one), or copies its segments into it (replacing those of the same name), and makes
the closed surfaces only when 3D display is asked for. The result here is six organ-sized ellipsoids on a
512x512x300 CT grid (--quick: 256x256x150), written by the engine's own .seg.nrrd writer with the shipped
model's labels. Medians of --repeats runs, each on a fresh scene.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedSegUNet"))  # the module's MRML package, as Slicer finds it beside the module

# (centre as a fraction of the volume, semi-axes in mm) of six organ-like blobs
ORGANS = [
    ((0.55, 0.40, 0.60), (90, 70, 80)),  # liver-sized
    ((0.45, 0.70, 0.60), (45, 35, 55)),
    ((0.35, 0.55, 0.45), (30, 25, 55)),
    ((0.65, 0.55, 0.45), (30, 25, 55)),
    ((0.50, 0.50, 0.70), (60, 45, 50)),
    ((0.50, 0.62, 0.50), (12, 12, 150)),  # aorta-like
]


def make_inputs(folder: Path, size: List[int], spacing: List[float]) -> Dict[str, Path]:
    from MedSegUNetLib.imageio.images import write_segmentation
    from MedSegUNetLib.model.bundle import read_bundle_metadata
    from MedSegUNetLib.model.shipped import find_model

    labels = read_bundle_metadata(find_model("abdomen-ct")).labels
    shape = size[::-1]
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    voxels = np.zeros(shape, np.uint8)
    for value, (centre, axes) in enumerate(ORGANS[: len(labels)], start=1):
        c = [f * n for f, n in zip(centre, size)]
        a = [mm / s for mm, s in zip(axes, spacing)]
        inside = ((i - c[0]) / a[0]) ** 2 + ((j - c[1]) / a[1]) ** 2 + ((k - c[2]) / a[2]) ** 2 <= 1
        voxels[inside & (voxels == 0)] = value
    label_image = sitk.GetImageFromArray(voxels)
    label_image.SetSpacing(spacing)
    ct = sitk.GetImageFromArray(np.where(voxels > 0, 60, -80).astype(np.int16))
    ct.CopyInformation(label_image)
    paths = {"volume": folder / "ct.nrrd", "result": folder / "result.seg.nrrd"}
    sitk.WriteImage(ct, str(paths["volume"]))
    write_segmentation(paths["result"], label_image, labels)
    return paths


def register_converters(slicer: Any) -> None:
    """What Slicer's Segmentations module registers at start-up."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def one_run(paths: Dict[str, Path]) -> Dict[str, float]:
    """The take-over into a new output node, again into the same node (its segments replaced in place),
    and the closed surfaces that 3D display needs, each timed on its own."""
    import slicer

    from MedSegUNetMRML.nodefiles import new_segmentation_node
    from MedSegUNetMRML.segments import take_over_result

    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)
    volume = logic.AddArchetypeVolume(str(paths["volume"]), "ct")
    output = new_segmentation_node(scene, "output")
    model = Path("abdomen-ct.safetensors")
    times = {}
    start = time.perf_counter()
    take_over_result(paths["result"], volume, output, model, surfaces=False)
    times["new node"] = time.perf_counter() - start
    start = time.perf_counter()
    take_over_result(paths["result"], volume, output, model, surfaces=False)
    times["replacing"] = time.perf_counter() - start
    start = time.perf_counter()
    if not output.CreateClosedSurfaceRepresentation():
        raise RuntimeError("no closed surfaces were made")
    times["3D surfaces"] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256x256x150 instead of 512x512x300")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    import slicer

    register_converters(slicer)
    size, spacing = ([256, 256, 150], [1.6, 1.6, 3.0]) if args.quick else ([512, 512, 300], [0.8, 0.8, 1.5])
    with tempfile.TemporaryDirectory(prefix="medsegunet-takeover-") as work:
        paths = make_inputs(Path(work), size, spacing)
        runs = [one_run(paths) for _ in range(args.repeats)]
    report = {
        "size": size,
        "spacing": spacing,
        "repeats": args.repeats,
        "median_s": {key: statistics.median(run[key] for run in runs) for key in runs[0]},
        "runs": runs,
    }
    print(f"take-over of a {'x'.join(map(str, size))} result with 6 segments, medians of {args.repeats} runs")
    for key, value in report["median_s"].items():
        print(f"  {key:12} {value:6.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
