"""MedSegUNet: U-Net segmentation of CT and MRI volumes in 3D Slicer, with a local edit-and-retrain loop.

Thin glue between Slicer and the engine (MedSegUNetLib, run as a child process with PythonSlicer):
nodes become files, files become nodes, progress is read without blocking the UI. Nothing here imports
torch or MONAI: Slicer starts as fast with this module as without it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin

from MedSegUNetLib.childprocess import (
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    ChildProcess,
    SegmentRequest,
    TrainRequest,
    engine_environment,
    engine_python,
    segment_command,
    train_command,
)

try:
    from typing import Annotated
except ImportError:  # Python < 3.9 is older than any Slicer this module supports
    from typing_extensions import Annotated

MODULE_DIR = Path(__file__).resolve().parent
if (MODULE_DIR.parent / "training").is_dir() and str(MODULE_DIR.parent) not in sys.path:
    sys.path.append(str(MODULE_DIR.parent))  # a source checkout: training/ sits beside MedSegUNet/
SETTINGS_MODELS = "MedSegUNet/UserModels"
# What the engine needs in Slicer's Python. Kept equal to pyproject.toml's dependencies by a test.
ENGINE_REQUIREMENTS = [
    "numpy>=1.24,<3",
    "monai>=1.4,<1.7",
    "SimpleITK>=2.3,<3",
    "slicerio>=1.4,<2",
    "pynrrd>=1.0,<2",
    "safetensors>=0.4,<1",
    "defusedxml>=0.7,<1",
    "tqdm>=4.60,<5",
    "scipy>=1.10,<2",
    "matplotlib>=3.7,<4",
    "tensorboard>=2.14,<3",
]
IMPORT_NAMES = {"pynrrd": "nrrd"}  # distributions whose import name differs


def distributionName(requirement: str) -> str:
    for separator in "<>=!~ ;[":
        requirement = requirement.split(separator)[0]
    return requirement.strip()


class MedSegUNet(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSegUNet"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSegUNet developers"]
        self.parent.helpText = (
            "Segment CT and MRI volumes with U-Net models, fix the result in the Segment Editor, and retrain "
            "the model from your annotated scenes, locally. The model runs in a background process: Slicer stays responsive."
        )
        self.parent.acknowledgementText = (
            "Built on MONAI, PyTorch, SimpleITK and slicerio. The shipped model was trained on sample scans from the "
            "TotalSegmentator package (Apache-2.0), whose reference masks were produced by TotalSegmentator."
        )


# --- parameters ------------------------------------------------------------------------------------


@parameterNodeWrapper
class MedSegUNetParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    useTTA: bool = False
    largestComponent: bool = True
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.5
    retrainMinutes: Annotated[float, WithinRange(0.5, 1440.0)] = 10.0
    retrainFromScratch: bool = False
    retrainSteps: Annotated[int, WithinRange(0, 1000000)] = 0


# --- the panel -------------------------------------------------------------------------------------


class MedSegUNetWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[MedSegUNetLogic] = None
        self._parameterNode: Optional[MedSegUNetParameterNode] = None
        self._parameterNodeGuiTag = None
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.devicesProbe: Optional[ChildProcess] = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSegUNet.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSegUNetLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.retrainButton.connect("clicked(bool)", self.onRetrainButton)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModel)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.showLogButton.connect("clicked(bool)", self.onShowLog)
        self.ui.refreshCasesButton.connect("clicked(bool)", self.refreshCases)
        self.ui.addScenesButton.connect("clicked(bool)", self.onAddScenes)
        self.timer.connect("timeout()", self.onTimer)

        self.ui.deviceComboBox.addItem("Auto", "auto")
        self.ui.deviceComboBox.addItem("CPU", "cpu")
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.timer.stop()
        if self.logic:
            self.logic.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.refreshCases()
        self.probeDevices()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanSegment)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self._parameterNode.inputVolume = volume

    def setParameterNode(self, inputParameterNode: Optional[MedSegUNetParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanSegment)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanSegment)
            self._checkCanSegment()

    def _checkCanSegment(self, caller=None, event=None) -> None:
        busy = self.logic.busy()
        ready = bool(self._parameterNode and self._parameterNode.inputVolume and self.currentModel())
        self.ui.segmentButton.enabled = busy == "segment" or (ready and not busy)
        self.ui.retrainButton.enabled = busy == "train" or not busy

    # --- models and devices ---

    def currentModel(self) -> Optional[Path]:
        data = self.ui.modelComboBox.currentData
        return Path(data) if data else None

    def refreshModels(self, select: Optional[Path] = None) -> None:
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        combo.clear()
        for path in self.logic.availableModels():
            combo.addItem(path.stem, str(path))
        combo.blockSignals(False)
        index = combo.findData(str(select)) if select else 0
        combo.setCurrentIndex(max(index, 0))
        self.onModelChanged()

    def onAddModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, "Add a MedSegUNet model", "", "Model bundles (*.safetensors)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("This file is not a MedSegUNet model bundle.", waitCursor=True):
            self.logic.describeModel(Path(path))  # refuses pickles and other files before it is listed
            self.logic.rememberModel(Path(path))
            self.refreshModels(select=Path(path))

    def onModelChanged(self, index: int = 0) -> None:
        model = self.currentModel()
        if not model:
            self.ui.modelInfoLabel.text = "No model: add a bundle (.safetensors) with Add..."
        else:
            try:
                self.ui.modelInfoLabel.text = self.logic.describeModel(model)
            except Exception as error:  # an unreadable bundle must not break the panel
                self.ui.modelInfoLabel.text = f"Cannot read {model.name}: {error}"
        self._checkCanSegment()

    def probeDevices(self) -> None:
        """Ask the engine (in a child process: torch is never imported here) which GPUs it sees."""
        if self.devicesProbe is not None or self.logic.dependenciesMissing():
            return
        self.devicesProbe = ChildProcess([engine_python(), "-m", "MedSegUNetLib", "devices"], engine_environment(MODULE_DIR))
        self.timer.start()

    def _collectDevices(self) -> None:
        if self.devicesProbe is None or self.devicesProbe.state == RUNNING or self.ui.deviceComboBox.count > 2:
            return
        for line in self.devicesProbe.log_lines:
            if line.startswith("{"):
                found = json.loads(line)
                for index, name in enumerate(found.get("cuda", [])):
                    self.ui.deviceComboBox.addItem(f"GPU {index}: {name}", "cuda")
                if found.get("mps"):
                    self.ui.deviceComboBox.addItem("Apple GPU (MPS)", "mps")

    # --- Segment ---

    def onSegmentButton(self) -> None:
        if self.logic.busy() == "segment":
            self.logic.cancel()
            self.ui.statusLabel.text = "Cancelling..."
            return
        if not self.ensureDependencies():
            return
        parameters = self._parameterNode
        output = parameters.outputSegmentation
        model = self.currentModel()
        replaced = self.logic.segmentsToReplace(output, model) if output else []
        if replaced and not slicer.util.confirmOkCancelDisplay(
            f"Replace the segments {', '.join(replaced)} of '{output.GetName()}'?", "MedSegUNet"
        ):
            return
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            self.logic.startSegment(
                parameters.inputVolume, model, self.ui.deviceComboBox.currentData, parameters.overlap,
                parameters.useTTA, parameters.largestComponent,
            )
            self._showRunning("Segment", "Starting...")

    def _showRunning(self, kind: str, text: str) -> None:
        button = self.ui.segmentButton if kind == "Segment" else self.ui.retrainButton
        button.text = "Cancel"
        self.ui.progressBar.visible = True
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.text = text
        self.ui.showLogButton.enabled = True
        self._checkCanSegment()
        self.timer.start()

    def onTimer(self) -> None:
        """Every 200 ms: drain progress records (never blocks), finish when the child has ended."""
        self._collectDevices()
        for record in self.logic.pollProgress():
            self._showProgress(record)
        finished = self.logic.finishedRun()
        if finished is not None:
            self._showFinished(*finished)
        if not self.logic.busy() and (self.devicesProbe is None or self.devicesProbe.state != RUNNING):
            self.timer.stop()

    def _showProgress(self, record: dict) -> None:
        total, done = int(record.get("total", 0)), int(record.get("done", 0))
        if total > 0 and done >= 0:
            self.ui.progressBar.setMaximum(total)
            self.ui.progressBar.setValue(done)
        text = f"{record.get('stage', '')}: {record.get('message', '')}"
        if record.get("eta_s"):
            text += f" (about {int(record['eta_s'] // 60)} min {int(record['eta_s'] % 60)} s left)"
        self.ui.statusLabel.text = text

    def _showFinished(self, kind: str, state: str, message: str) -> None:
        self.ui.segmentButton.text = "Segment"
        self.ui.retrainButton.text = "Retrain"
        self.ui.progressBar.visible = state == RUNNING
        if state == SUCCEEDED and kind == "segment":
            self.ui.statusLabel.text = message
        elif state == SUCCEEDED and kind == "train":
            self.refreshModels(select=Path(message))
            self.ui.statusLabel.text = f"New model {Path(message).parent.name} added to the model list."
        elif state == CANCELLED:
            self.ui.statusLabel.text = "Cancelled."
        else:
            self.ui.statusLabel.text = f"Failed: {message}"
            slicer.util.errorDisplay(f"MedSegUNet {kind} failed:\n{message}", detailedText=self.logic.logText())
        self._checkCanSegment()

    def onShowLog(self) -> None:
        slicer.util.infoDisplay("The engine's output (most recent run):", detailedText=self.logic.logText() or "(empty)")

    # --- Retrain ---

    def refreshCases(self) -> None:
        listed = self.ui.casesListWidget
        checked_files = [listed.item(i).data(qt.Qt.UserRole) for i in range(listed.count) if listed.item(i).data(qt.Qt.UserRole)]
        listed.clear()
        for volume, segmentation in self.logic.annotatedPairs():
            entry = qt.QListWidgetItem(f"{volume.GetName()}  +  {segmentation.GetName()}")
            entry.setFlags(entry.flags() | qt.Qt.ItemIsUserCheckable)
            entry.setCheckState(qt.Qt.Checked)
            entry.setData(qt.Qt.UserRole + 1, segmentation.GetID())
            listed.addItem(entry)
        for path in checked_files:
            self._addSceneItem(path)

    def _addSceneItem(self, path: str) -> None:
        entry = qt.QListWidgetItem(Path(path).name)
        entry.setFlags(entry.flags() | qt.Qt.ItemIsUserCheckable)
        entry.setCheckState(qt.Qt.Checked)
        entry.setData(qt.Qt.UserRole, path)
        entry.setToolTip(path)
        self.ui.casesListWidget.addItem(entry)

    def onAddScenes(self) -> None:
        paths = qt.QFileDialog.getOpenFileNames(self.parent, "Annotated Slicer scenes", "", "Slicer scenes (*.mrb *.mrml)")
        for path in paths:
            self._addSceneItem(path)

    def checkedCases(self):
        segmentation_ids, files = [], []
        listed = self.ui.casesListWidget
        for i in range(listed.count):
            entry = listed.item(i)
            if entry.checkState() != qt.Qt.Checked:
                continue
            if entry.data(qt.Qt.UserRole):
                files.append(Path(entry.data(qt.Qt.UserRole)))
            else:
                segmentation_ids.append(entry.data(qt.Qt.UserRole + 1))
        return [slicer.mrmlScene.GetNodeByID(i) for i in segmentation_ids], files

    def onRetrainButton(self) -> None:
        if self.logic.busy() == "train":
            self.logic.cancel()
            self.ui.statusLabel.text = "Cancelling (the last checkpoint is kept)..."
            return
        segmentations, files = self.checkedCases()
        if not segmentations and not files:
            slicer.util.warningDisplay("Check at least one annotated case (a volume with its segmentation, or a .mrb scene).")
            return
        if not self.ensureDependencies():
            return
        init = None if self._parameterNode.retrainFromScratch else self.currentModel()
        with slicer.util.tryWithErrorDisplay("Could not start training.", waitCursor=True):
            steps = self._parameterNode.retrainSteps or None
            self.logic.startTrain(segmentations, files, init, self._parameterNode.retrainMinutes, self.ui.deviceComboBox.currentData, steps)
            self._showRunning("Retrain", "Saving the annotated cases...")

    # --- dependencies ---

    def ensureDependencies(self) -> bool:
        missing = self.logic.dependenciesMissing()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            "MedSegUNet needs these Python packages, which are not installed in Slicer yet:\n"
            f"{', '.join(missing)}\n\nInstall them now? (This downloads several hundred MB and takes a few minutes.)",
            "MedSegUNet: install dependencies",
        ):
            return False
        with slicer.util.tryWithErrorDisplay("Installing the dependencies failed.", waitCursor=True):
            self.logic.installDependencies(missing)
        self.probeDevices()
        return not self.logic.dependenciesMissing()


# --- Slicer glue -----------------------------------------------------------------------------------


class MedSegUNetLogic(ScriptedLoadableModuleLogic):
    """Nodes to files and back, and one engine run at a time. All process handling is childprocess.py's."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.run: Optional[ChildProcess] = None
        self.runKind: Optional[str] = None
        self.workFolder: Optional[tempfile.TemporaryDirectory] = None
        self.pending: dict = {}
        self.lastLog = ""

    def getParameterNode(self):
        return MedSegUNetParameterNode(super().getParameterNode())

    # --- models ---

    @staticmethod
    def shippedModelFolders() -> List[Path]:
        return [MODULE_DIR / "Resources" / "Models", MODULE_DIR.parent / "Resources" / "Models"]

    def availableModels(self) -> List[Path]:
        seen, models = set(), []
        candidates = [p for folder in self.shippedModelFolders() if folder.is_dir() for p in sorted(folder.glob("*.safetensors"))]
        candidates += [Path(p) for p in self.rememberedModels()]
        for path in candidates:
            if path.is_file() and path.resolve() not in seen:
                seen.add(path.resolve())
                models.append(path)
        return models

    def rememberedModels(self) -> List[str]:
        value = qt.QSettings().value(SETTINGS_MODELS) or []
        return [value] if isinstance(value, str) else list(value)

    def rememberModel(self, path: Path) -> None:
        models = [p for p in self.rememberedModels() if p != str(path)] + [str(path)]
        qt.QSettings().setValue(SETTINGS_MODELS, models)

    @staticmethod
    def describeModel(path: Path) -> str:
        """Labels, spacing and provenance, read from the bundle's header (no torch needed)."""
        from MedSegUNetLib.bundle import read_bundle_metadata

        meta = read_bundle_metadata(path)
        labels = ", ".join(label.name for label in meta.labels)
        spacing = "x".join(f"{s:g}" for s in meta.preprocessing.target_spacing)
        provenance = meta.provenance or {}
        metrics = provenance.get("metrics") or {}
        dice = f", validation Dice {metrics['dice_mean']:.2f}" if isinstance(metrics.get("dice_mean"), (int, float)) else ""
        return f"{len(meta.labels)} structures: {labels}\n{spacing} mm, channels {', '.join(meta.channels)}; created {provenance.get('created', '?')[:10]}{dice}"

    # --- dependencies ---

    @staticmethod
    def dependenciesMissing() -> List[str]:
        """Distributions whose module Slicer's Python cannot find (checked without importing them)."""
        names = ["torch"] + [distributionName(r) for r in ENGINE_REQUIREMENTS]
        return [name for name in names if importlib.util.find_spec(IMPORT_NAMES.get(name, name)) is None]

    @staticmethod
    def installDependencies(missing: List[str]) -> None:
        """torch through the PyTorch extension when it is installed (it picks the CUDA build), the rest with pip."""
        if "torch" in missing:
            if importlib.util.find_spec("PyTorchUtils") is not None:
                import PyTorchUtils

                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                    raise RuntimeError("PyTorch was not installed")
            else:
                slicer.util.pip_install("torch")
        wanted = [r for r in ENGINE_REQUIREMENTS if distributionName(r) in missing]
        if wanted:
            slicer.util.pip_install(wanted)  # a list: no shell quoting of the version ranges

    # --- runs ---

    def busy(self) -> Optional[str]:
        return self.runKind if self.run is not None and self.run.state == RUNNING else None

    def cancel(self) -> None:
        if self.run is not None and self.run.state == RUNNING:
            self.run.cancel()

    def pollProgress(self) -> List[dict]:
        return self.run.poll() if self.run is not None else []

    def logText(self) -> str:
        return self.run.log_text() if self.run is not None else self.lastLog

    def _newWorkFolder(self) -> Path:
        if self.workFolder is not None:
            self.workFolder.cleanup()
        self.workFolder = tempfile.TemporaryDirectory(prefix="MedSegUNet-", dir=slicer.app.temporaryPath)
        return Path(self.workFolder.name)

    def _start(self, kind: str, command: List[str], **pending) -> None:
        if self.busy():
            raise RuntimeError(f"a {self.busy()} run is still going")
        self.pending = pending
        self.runKind = kind
        self.run = ChildProcess(command, engine_environment(MODULE_DIR))
        logging.info("MedSegUNet: %s", " ".join(command))

    @staticmethod
    def writeVolume(volumeNode, path: Path) -> Path:
        """The volume as NRRD through a storage node of its own: the node's own storage stays untouched."""
        storage = slicer.mrmlScene.CreateNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.UnRegister(None)  # CreateNodeByClass returns a reference we own
        storage.SetFileName(str(path))
        storage.SetUseCompression(False)  # written once, read once: compression only costs time
        if not storage.WriteData(volumeNode):
            raise RuntimeError(f"could not write {volumeNode.GetName()} to {path}")
        return path

    @staticmethod
    def writeSegmentation(segmentationNode, path: Path) -> Path:
        storage = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentationStorageNode")
        storage.UnRegister(None)
        storage.SetFileName(str(path))
        if not storage.WriteData(segmentationNode):
            raise RuntimeError(f"could not write {segmentationNode.GetName()} to {path}")
        return path

    def segmentCommand(self, inputPath: Path, model: Path, outputPath: Path, device: str, overlap: float, tta: bool, largest: bool) -> List[str]:
        """The exact command line Segment runs (tested outside Slicer on a real file)."""
        return segment_command(SegmentRequest([inputPath], model, outputPath, device or "auto", overlap, tta, largest))

    def startSegment(self, volumeNode, model: Path, device: str, overlap: float, tta: bool, largest: bool) -> None:
        folder = self._newWorkFolder()
        inputPath = self.writeVolume(volumeNode, folder / "input.nrrd")
        outputPath = folder / "result.seg.nrrd"
        command = self.segmentCommand(inputPath, model, outputPath, device, overlap, tta, largest)
        self._start("segment", command, volumeNode=volumeNode, outputPath=outputPath, model=model)

    def trainCommand(self, data: List[Path], output: Path, init: Optional[Path], minutes: Optional[float], device: str, maxSteps: Optional[int] = None) -> List[str]:
        return train_command(TrainRequest(data, output, init, minutes, maxSteps, device or "auto"))

    def trainedModelsFolder(self) -> Path:
        folder = Path(slicer.app.slicerUserSettingsFilePath).parent / "MedSegUNet" / "models"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def startTrain(self, segmentationNodes, sceneFiles: List[Path], init: Optional[Path], minutes: Optional[float], device: str, maxSteps: Optional[int] = None) -> None:
        """Save the checked pairs as a scene (what `training` reads), then train in a child process."""
        from training.scene_writer import ScenePair, write_mrml_scene

        folder = self._newWorkFolder()
        pairs = []
        for index, segmentation in enumerate(segmentationNodes):
            volume = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
            if volume is None:
                raise ValueError(f"segmentation '{segmentation.GetName()}' has no reference volume")
            image = self.writeVolume(volume, folder / f"volume{index}.nrrd")
            labels = self.writeSegmentation(segmentation, folder / f"segmentation{index}.seg.nrrd")
            pairs.append(ScenePair(volume.GetName(), image, labels, segmentation.GetName()))
        data = list(sceneFiles)
        if pairs:
            data.insert(0, write_mrml_scene(folder / "scene", "annotations", pairs))
        output = self.trainedModelsFolder() / time.strftime("model-%Y%m%d-%H%M%S")
        command = self.trainCommand(data, output, init, minutes, device, maxSteps)
        self._start("train", command, output=output)

    def finishedRun(self):
        """(kind, state, message) once when a run has ended; the segmentation is loaded here."""
        if self.run is None or self.run.state == RUNNING or not self.runKind:
            return None
        kind, state, run = self.runKind, self.run.state, self.run
        self.runKind, self.lastLog = None, run.log_text()
        message = run.error_message if state == FAILED else ""
        if state == SUCCEEDED and kind == "segment":
            try:
                node = self.loadResult(self.pending["outputPath"], self.pending["volumeNode"], self.pending["model"])
                message = f"Done: {node.GetSegmentation().GetNumberOfSegments()} segments in '{node.GetName()}'."
            except Exception as error:  # report in the panel; the run itself succeeded
                state, message = FAILED, f"could not load the result: {error}"
        elif state == SUCCEEDED and kind == "train":
            bundle = Path((run.result or {}).get("bundle", self.pending["output"] / "model.safetensors"))
            self.rememberModel(bundle)
            message = str(bundle)
        return kind, state, message

    # --- results into nodes ---

    @staticmethod
    def annotatedPairs():
        """(volume, segmentation) pairs of the scene: segmentations tied to a volume with segments."""
        pairs = []
        for segmentation in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
            volume = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
            if volume is not None and segmentation.GetSegmentation().GetNumberOfSegments() > 0:
                pairs.append((volume, segmentation))
        return pairs

    def segmentsToReplace(self, segmentationNode, model: Path) -> List[str]:
        from MedSegUNetLib.bundle import read_bundle_metadata

        names = {label.name.casefold() for label in read_bundle_metadata(model).labels}
        segmentation = segmentationNode.GetSegmentation()
        existing = [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName() for i in range(segmentation.GetNumberOfSegments())]
        return [name for name in existing if name.casefold() in names]

    def outputNodeFor(self, volumeNode):
        parameters = self.getParameterNode()
        node = parameters.outputSegmentation
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volumeNode.GetName()} segmentation")
            node.CreateDefaultDisplayNodes()
            parameters.outputSegmentation = node
        return node

    def loadResult(self, path: Path, volumeNode, model: Path):
        """Copy the engine's .seg.nrrd segments (names, colors, terminology) into the output node."""
        loaded = slicer.util.loadSegmentation(str(path))
        try:
            target = self.outputNodeFor(volumeNode)
            target.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            source, destination = loaded.GetSegmentation(), target.GetSegmentation()
            for index in range(source.GetNumberOfSegments()):
                segmentId = source.GetNthSegmentID(index)
                name = source.GetSegment(segmentId).GetName()
                existing = destination.GetSegmentIdBySegmentName(name)
                if existing:
                    destination.RemoveSegment(existing)
                destination.CopySegmentFromSegmentation(source, segmentId, False)
            target.CreateClosedSurfaceRepresentation()
            target.SetAttribute("MedSegUNet.Model", str(model))
        finally:
            slicer.mrmlScene.RemoveNode(loaded)
        return target

    def segmentAndWait(self, volumeNode, model: Path, device: str = "cpu", timeoutSeconds: float = 600, cancelAfterFirstProgress: bool = False):
        """Blocking form for the self-test and scripts: runs, keeps the UI alive, returns the end state."""
        self.startSegment(volumeNode, model, device, 0.25, False, True)
        return self._waitForEnd(timeoutSeconds, cancelAfterFirstProgress)

    def trainAndWait(self, segmentationNodes, init: Optional[Path], maxSteps: int, timeoutSeconds: float = 900):
        self.startTrain(segmentationNodes, [], init, None, "cpu", maxSteps)
        return self._waitForEnd(timeoutSeconds, False)

    def _waitForEnd(self, timeoutSeconds: float, cancelAfterFirstProgress: bool):
        deadline = time.monotonic() + timeoutSeconds
        while time.monotonic() < deadline:
            slicer.app.processEvents()
            records = self.pollProgress()
            if cancelAfterFirstProgress and records:
                self.cancel()
            finished = self.finishedRun()
            if finished is not None:
                return finished
            time.sleep(0.05)
        self.cancel()
        raise TimeoutError(f"the engine did not finish within {timeoutSeconds} s")


# --- self-test, run inside Slicer --------------------------------------------------------------------


class MedSegUNetTest(ScriptedLoadableModuleTest):
    """Segment a synthetic volume with a shipped model, cancel a run, retrain with a small budget.

    Run: Slicer --no-main-window --python-code "slicer.util.selectModule('MedSegUNet');
    slicer.modules.MedSegUNetWidget.onReloadAndTest(); slicer.util.exit()" or the extension's ctest.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()
        MedSegUNetLogic().getParameterNode().outputSegmentation = None  # the parameter node is a singleton

    def runTest(self):
        self.setUp()
        self.test_dependencies_and_model()
        self.setUp()
        self.test_segment_fills_a_segmentation_on_the_volume_grid()
        self.setUp()
        self.test_cancel_leaves_no_segments()
        self.setUp()
        self.test_retrain_registers_a_new_model()

    def model(self) -> Path:
        models = MedSegUNetLogic().availableModels()
        self.assertTrue(models, "no shipped model found in Resources/Models")
        return models[0]

    def syntheticVolume(self):
        """A CT-like volume with a bright 'organ', oblique spacing and origin, from numpy (no download)."""
        import numpy as np

        rng = np.random.default_rng(0)
        array = rng.normal(-80, 20, (40, 96, 112)).astype(np.int16)  # KJI order, as slicer.util expects
        k, j, i = np.ogrid[:40, :96, :112]
        array[((k - 20) / 12.0) ** 2 + ((j - 48) / 30.0) ** 2 + ((i - 50) / 34.0) ** 2 <= 1] = 60
        volume = slicer.util.addVolumeFromArray(array, ijkToRAS=None, name="MedSegUNet test volume")
        volume.SetSpacing(1.5, 1.5, 3.0)
        volume.SetOrigin(-80.0, 40.0, -20.0)
        return volume, array

    def test_dependencies_and_model(self):
        self.delayDisplay("Dependencies and the shipped model")
        logic = MedSegUNetLogic()
        self.assertEqual(logic.dependenciesMissing(), [], "install the dependencies (the panel offers it) before the self-test")
        description = logic.describeModel(self.model())
        self.assertIn("structures", description)

    def test_segment_fills_a_segmentation_on_the_volume_grid(self):
        self.delayDisplay("Segment")
        from MedSegUNetLib.bundle import read_bundle_metadata

        volume, array = self.syntheticVolume()
        logic = MedSegUNetLogic()
        kind, state, message = logic.segmentAndWait(volume, self.model())
        self.assertEqual((kind, state), ("segment", SUCCEEDED), f"{message}\n{logic.logText()}")
        node = logic.getParameterNode().outputSegmentation
        self.assertIsNotNone(node)
        segmentation = node.GetSegmentation()
        expected = [label.name for label in read_bundle_metadata(self.model()).labels]
        names = [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, expected)  # every label, empty ones included, in the bundle's order
        self.assertEqual(node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()).GetID(), volume.GetID())
        for segmentId in [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]:
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentId, volume)
            self.assertEqual(mask.shape, array.shape)  # on the volume's grid: same KJI shape
        self.assertEqual(node.GetAttribute("MedSegUNet.Model"), str(self.model()))

    def test_cancel_leaves_no_segments(self):
        self.delayDisplay("Cancel")
        volume, _ = self.syntheticVolume()
        logic = MedSegUNetLogic()
        started = time.monotonic()
        kind, state, _ = logic.segmentAndWait(volume, self.model(), cancelAfterFirstProgress=True)
        self.assertEqual(state, CANCELLED)
        self.assertLess(time.monotonic() - started, 60)
        self.assertIsNone(logic.getParameterNode().outputSegmentation)
        self.assertIsNone(logic.busy())

    def test_retrain_registers_a_new_model(self):
        self.delayDisplay("Retrain with a small budget")
        import numpy as np

        volume, array = self.syntheticVolume()
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "annotation")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("organ")
        slicer.util.updateSegmentBinaryLabelmapFromArray((array > 0).astype(np.uint8), segmentationNode, segmentId, volume)
        logic = MedSegUNetLogic()
        self.assertIn((volume, segmentationNode), logic.annotatedPairs())
        kind, state, message = logic.trainAndWait([segmentationNode], init=self.model(), maxSteps=2)
        self.assertEqual((kind, state), ("train", SUCCEEDED), f"{message}\n{logic.logText()}")
        bundle = Path(message)
        self.assertTrue(bundle.is_file())
        self.assertIn(bundle, logic.availableModels())
        from MedSegUNetLib.bundle import read_bundle_metadata

        self.assertIn("organ", [label.name for label in read_bundle_metadata(bundle).labels])
        self.delayDisplay("MedSegUNet self-test passed")
