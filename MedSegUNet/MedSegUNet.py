"""MedSegUNet: U-Net segmentation of CT and MRI volumes in 3D Slicer, with a local edit-and-retrain loop.

Thin glue between Slicer and the engine (MedSegUNetLib, run as a child process with PythonSlicer):
nodes become files, files become nodes, progress is read without blocking the UI. All process handling
(command lines, progress reading, cancel of the whole process tree) is MedSegUNetLib.host.childprocess's,
which is plain Python tested outside Slicer. Nothing here imports torch, MONAI or numpy at module level:
Slicer starts as fast with this module as without it.
"""

import importlib
import importlib.metadata
import importlib.util
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, List, Optional, Tuple

import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MedSegUNetLib.host.childprocess import (
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    ChildProcess,
    SegmentRequest,
    StandbyEngine,
    TrainRequest,
    devices_command,
    devices_from_names,
    engine_environment,
    engine_python,
    import_command,
    parse_devices,
    segment_arguments,
    segment_command,
    train_command,
)
from MedSegUNetMRML import annotations, nodefiles, segments
from MedSegUNetPanel.model_text import modelDetails, modelLabel, modelSetText, modelSummary

try:  # Slicer's translation function, as the module template uses it; absent from the API snapshots
    from slicer.i18n import tr as _
except ImportError:

    def _(text: str) -> str:
        return text


MODULE_DIR = Path(__file__).resolve().parent
USER_MODELS_KEY = "MedSegUNet/UserModels"  # qt.QSettings: the bundles the user added or trained
KEEP_READY_KEY = "MedSegUNet/KeepEngineReady"  # qt.QSettings: start the next engine before the click
# What the engine needs in Slicer's Python; a test keeps these equal to pyproject.toml's dependencies.
TORCH_REQUIREMENT = "torch>=2.3,<3"
ENGINE_REQUIREMENTS = [
    "numpy>=1.24,<3",
    "monai>=1.4,<1.7",
    "SimpleITK>=2.3,<3",
    "slicerio>=1.4,<2",
    "pynrrd>=1.0,<2",
    "safetensors>=0.4,<1",
    "defusedxml>=0.7,<1",
    "pyyaml>=6,<7",
    "pydicom>=2.4,<4",
    "tqdm>=4.60,<5",
    "scipy>=1.10,<2",
    "isal>=1.6,<2",
    "matplotlib>=3.7,<4",
    "tensorboard>=2.14,<3",
    "dynamic-network-architectures>=0.4.4,<0.5",
]
IMPORT_NAMES = {
    "pynrrd": "nrrd",
    "pyyaml": "yaml",
    "dynamic-network-architectures": "dynamic_network_architectures",
}  # import name differs


def distributionName(requirement: str) -> str:
    for separator in "<>=!~ ;[":
        requirement = requirement.split(separator)[0]
    return requirement.strip()


class MedSegUNet(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSegUNet"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []  # the PyTorch extension is used when present, not required
        self.parent.contributors = ["MedSegUNet developers"]
        self.parent.helpText = (
            "Segment CT and MRI volumes with U-Net models, fix the result in the Segment Editor, and retrain "
            "the model from your annotated scenes, locally. The model runs in a background process, so Slicer "
            "stays responsive; Cancel ends it. The first Segment or Retrain offers to install PyTorch and MONAI."
        )
        self.parent.acknowledgementText = (
            "Built on MONAI, PyTorch, SimpleITK and slicerio. The shipped model was trained on sample scans from the "
            "TotalSegmentator package (Apache-2.0), whose reference masks were produced by TotalSegmentator."
        )


# --- parameters ------------------------------------------------------------------------------------


@parameterNodeWrapper
class MedSegUNetParameterNode:
    """The panel's state, bound to the widgets whose SlicerParameterName is the field's name."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    useTTA: bool = False
    largestComponent: bool = True
    show3D: bool = False  # surfaces on request: the take-over stays off Slicer's main thread's critical path
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.5
    retrainFromScratch: bool = False
    retrainMinutes: Annotated[float, WithinRange(0.5, 1440.0)] = 10.0
    retrainSteps: Annotated[int, WithinRange(0, 1000000)] = 0


# --- the panel -------------------------------------------------------------------------------------


class MedSegUNetWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Segmentation (input, model, output, Segment with its progress; Advanced collapsed), then Retraining.

    Each run's progress bar, status line and Show log sit right under the button that started it."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self.shownModelOverlap: Optional[float] = None  # what showModelOverlap put in Overlap
        self._parameterNodeGuiTag = None
        self.timer = None
        self.cancelling = False
        self.runningKind = "segment"  # the kind of the latest run started from the panel
        self.logs = {}  # kind -> the log of its latest finished run, for its Show log button

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSegUNet.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSegUNetLogic()
        self.timer = qt.QTimer()
        self.timer.setInterval(200)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.connectSignals()
        self.ui.deviceComboBox.addItem(_("Auto"), "auto")
        self.ui.deviceComboBox.addItem(_("CPU"), "cpu")
        self.ui.progressBar.hide()
        self.ui.retrainProgressBar.hide()
        self.onModelDetailsToggled(self.ui.modelDetailsButton.checked)
        self.ui.keepReadyCheckBox.checked = self.logic.keepEngineReady()
        self.refreshModels()
        self.initializeParameterNode()

    def connectSignals(self) -> None:
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.retrainButton.connect("clicked(bool)", self.onRetrainButton)
        self.addModelMenu()
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.modelDetailsButton.connect("toggled(bool)", self.onModelDetailsToggled)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.keepReadyCheckBox.connect("toggled(bool)", self.onKeepReadyToggled)
        self.ui.show3DCheckBox.connect("toggled(bool)", self.onShow3DToggled)
        self.ui.fromScratchCheckBox.connect("toggled(bool)", self.onFromScratchToggled)
        self.ui.showLogButton.connect("clicked(bool)", self.onShowSegmentLog)
        self.ui.retrainShowLogButton.connect("clicked(bool)", self.onShowRetrainLog)
        self.ui.refreshCasesButton.connect("clicked(bool)", self.refreshCases)
        self.ui.addScenesButton.connect("clicked(bool)", self.onAddScenes)
        self.ui.addFolderButton.connect("clicked(bool)", self.onAddFolder)
        self.timer.connect("timeout()", self.onTimer)

    def cleanup(self) -> None:
        if self.timer:
            self.timer.stop()
        if self.logic:
            self.logic.cancel()
            self.logic.stopStandby()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.refreshCases()
        self.probeDevices()
        missing = self.logic.dependenciesMissing()
        if missing and not self.logic.busy():
            self.ui.statusLabel.text = _("Not installed yet: {packages}. Segment offers to install them.").format(
                packages=", ".join(missing)
            )
        self.prepareEngine(entering=True)  # isEntered may not be set yet while enter() runs

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic.busy() == "segment":
            self.logic.cancel()  # its input volume is about to go away
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

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self.updateButtons()

    def updateButtons(self, caller=None, event=None) -> None:
        busy = self.logic.busy()
        ready = bool(self._parameterNode and self._parameterNode.inputVolume and self.currentModel())
        underSegment = busy in ("segment", "import")  # both show their progress under the Segment button
        self.ui.segmentButton.text = _("Cancel") if underSegment else _("Segment")
        self.ui.retrainButton.text = _("Cancel") if busy == "train" else _("Retrain")
        self.ui.segmentButton.enabled = (underSegment and not self.cancelling) or (not busy and ready)
        self.ui.retrainButton.enabled = (busy == "train" and not self.cancelling) or not busy
        self.ui.addModelButton.enabled = not busy
        if underSegment:
            self.ui.segmentButton.toolTip = _("Ends the background run.")
        elif ready:
            self.ui.segmentButton.toolTip = _("Run the model in a background process.")
        else:
            self.ui.segmentButton.toolTip = _("Select an input volume and a model first.")

    # --- models and devices ---

    def currentModel(self) -> Optional[Path]:
        data = self.ui.modelComboBox.currentData
        return Path(data) if data else None

    def refreshModels(self, select: Optional[Path] = None) -> None:
        combo = self.ui.modelComboBox
        previous = select or self.currentModel()
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for path in self.logic.availableModels():
            combo.addItem(modelLabel(path), str(path))
            combo.setItemData(combo.count - 1, str(path), qt.Qt.ToolTipRole)
        combo.blockSignals(wasBlocked)
        index = combo.findData(str(previous)) if previous else -1
        combo.setCurrentIndex(max(index, 0))
        self.onModelChanged()

    def addModelMenu(self) -> None:
        """Add model...: a MedSegUNet bundle, or another tool's model (imported in the background)."""
        menu = qt.QMenu(self.ui.addModelButton)
        for text, slot in (
            (_("MedSegUNet bundle (.safetensors)..."), self.onAddModel),
            (_("nnU-Net or MONAI model as a .zip..."), self.onImportModelFile),
            (_("nnU-Net results folder or MONAI bundle folder..."), self.onImportModelFolder),
            (_("Model set: several listed models run as one..."), self.onAddModelSet),
        ):
            menu.addAction(text).connect("triggered()", slot)
        self.ui.addModelButton.setMenu(menu)
        self.ui.addModelButton.popupMode = qt.QToolButton.InstantPopup

    def onAddModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("Add a MedSegUNet model"), "", _("Model bundles (*.safetensors)")
        )
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("This file is not a MedSegUNet model bundle."), waitCursor=True):
            self.logic.describeModel(Path(path))  # refuses pickles and other files before it is listed
            self.logic.rememberModel(Path(path))
            self.refreshModels(select=Path(path))

    def onAddModelSet(self) -> None:
        """Several bundles (e.g. the five models of one TotalSegmentator task) listed, and run, as one."""
        paths = qt.QFileDialog.getOpenFileNames(
            self.parent, _("Models of the set, in order of precedence"), "", _("Model bundles (*.safetensors)")
        )
        if len(paths) < 2:
            if paths:
                slicer.util.warningDisplay(_("A model set needs at least two models."))
            return
        name = qt.QInputDialog.getText(self.parent, _("Model set"), _("Name of the set:"))
        if not name or not name.strip():
            return
        with slicer.util.tryWithErrorDisplay(_("Could not make the model set."), waitCursor=True):
            path = self.logic.createModelSet(name.strip(), [Path(p) for p in paths])
            self.refreshModels(select=path)

    def onImportModelFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Import a model"), "", _("Zipped models (*.zip)"))
        if path:
            self.importModel(Path(path))

    def onImportModelFolder(self) -> None:
        path = qt.QFileDialog.getExistingDirectory(self.parent, _("Import a model folder"))
        if path:
            self.importModel(Path(path))

    def importModel(self, source: Path) -> None:
        """Another tool's model into a bundle, in a child process with progress under Segment."""
        if not self.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the import."), waitCursor=True):
            self.logic.startImport(source)
            self.showRunning("import", _("Importing {source}...").format(source=source.name))

    def onModelChanged(self, index: int = 0) -> None:
        """One line under the list; the rest (scores per structure, resolution, training) behind Details."""
        model = self.currentModel()
        summary, details = _("No model yet: add a bundle (.safetensors) with Add model..."), ""
        if model:
            try:
                summary, _separator, details = self.logic.describeModel(model).partition("\n")
            except Exception as error:  # an unreadable bundle must not break the panel
                summary = _("Cannot read {file}: {error}").format(file=model.name, error=error)
        self.ui.modelInfoLabel.text = summary
        self.ui.modelInfoLabel.toolTip = details or summary
        self.ui.modelDetailsLabel.text = details
        self.ui.modelDetailsButton.enabled = bool(details)
        self.onModelDetailsToggled(self.ui.modelDetailsButton.checked)
        self.showModelOverlap(model)
        self.updateButtons()
        self.updateRetrainTarget()
        self.prepareEngine()

    def showModelOverlap(self, model: Optional[Path]) -> None:
        """Overlap starts at the model's own (an imported model's tool's); left there, Segment runs each
        model, of a set too, with its own."""
        self.shownModelOverlap = None
        if not model or not self._parameterNode:
            return
        try:
            own = self.logic.modelOverlap(model)
        except Exception:  # the line under the list already says why the model cannot be read
            return
        self._parameterNode.overlap = min(own, self.ui.overlapSliderWidget.maximum)
        self.shownModelOverlap = self._parameterNode.overlap

    def chosenOverlap(self) -> Optional[float]:
        """The overlap the user set, or None while Overlap still shows the model's own."""
        overlap = self._parameterNode.overlap
        step = self.ui.overlapSliderWidget.singleStep
        if self.shownModelOverlap is not None and abs(overlap - self.shownModelOverlap) < step / 2:
            return None
        return overlap

    def onModelDetailsToggled(self, shown: bool) -> None:
        shown = bool(shown and self.ui.modelDetailsLabel.text)
        self.ui.modelDetailsLabel.visible = shown
        self.ui.modelDetailsButton.arrowType = qt.Qt.DownArrow if shown else qt.Qt.RightArrow

    def onDeviceChanged(self, index: int = 0) -> None:
        self.updateRetrainTarget()
        self.prepareEngine()

    def onFromScratchToggled(self, fromScratch: bool) -> None:
        self.updateRetrainTarget()

    def deviceDescription(self) -> str:
        """Where a run goes, in words, for the Retraining section."""
        device = self.ui.deviceComboBox.currentData
        if not device or device == "auto":
            return _("on a GPU if one is found, else on the CPU")
        if device == "cpu":
            return _("on the CPU")
        return _("on {device}").format(device=self.ui.deviceComboBox.currentText)

    def updateRetrainTarget(self) -> None:
        """Which model Retrain starts from and where it runs, next to its button."""
        model = self.currentModel()
        if self.ui.fromScratchCheckBox.checked:
            text = _("Trains a new model {device}.").format(device=self.deviceDescription())
        elif model and self.logic.isModelSet(model):
            text = _("A model set is not fine-tuned as one: select one of its models, or check 'Train from scratch'.")
        elif model:
            text = _("Fine-tunes {model} {device}.").format(model=modelLabel(model), device=self.deviceDescription())
        else:
            text = _("Select a model to fine-tune, or check 'Train from scratch'.")
        self.ui.retrainTargetLabel.text = text

    def onShow3DToggled(self, show: bool) -> None:
        node = self._parameterNode.outputSegmentation if self._parameterNode else None
        if node is not None:
            with slicer.util.tryWithErrorDisplay(_("Could not change the 3D display."), waitCursor=True):
                self.logic.showIn3D(node, show)

    def onKeepReadyToggled(self, keep: bool) -> None:
        self.logic.setKeepEngineReady(keep)
        self.prepareEngine()

    def prepareEngine(self, entering: bool = False) -> None:
        """The engine for the next Segment, started now with the selected model and device (while the
        panel is shown and nothing runs; the logic decides whether one is wanted)."""
        if self.logic is None or not (entering or self.parent.isEntered):
            return
        try:
            self.logic.prepareStandby(self.currentModel(), self.ui.deviceComboBox.currentData)
        except Exception:  # Segment starts a fresh engine then: never worse than without one
            logging.exception("MedSegUNet: could not start the engine ahead")

    def probeDevices(self) -> None:
        """GPUs for the device list: from torch if Slicer already imported it, else a quick child process."""
        if self.ui.deviceComboBox.count > 2 or self.logic.dependenciesMissing():
            return
        found = self.logic.devicesIfTorchLoaded()
        if found is not None:
            self.addDevices(found)
        elif self.logic.startDeviceProbe():
            self.timer.start()

    def addDevices(self, devices: List[Tuple[str, str]]) -> None:
        combo = self.ui.deviceComboBox
        for label, device in devices:
            if combo.findData(device) < 0:
                combo.insertItem(combo.count - 1, label, device)  # GPUs before "CPU"

    # --- Segment ---

    def onSegmentButton(self) -> None:
        if self.logic.busy() in ("segment", "import"):
            self.cancelRun()
            return
        if not self.ensureDependencies():
            return
        parameters = self._parameterNode
        model, output = self.currentModel(), parameters.outputSegmentation
        replaced = self.logic.segmentsToReplace(output, model) if output else []
        if replaced and not slicer.util.confirmOkCancelDisplay(
            _("Replace the segments {segments} of '{output}' with the model's result?").format(
                segments=", ".join(replaced), output=output.GetName()
            ),
            "MedSegUNet",
        ):
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the segmentation."), waitCursor=True):
            self.logic.startSegment(
                parameters.inputVolume,
                output,
                model,
                self.ui.deviceComboBox.currentData,
                self.chosenOverlap(),
                parameters.useTTA,
                parameters.largestComponent,
                parameters.show3D,
            )
            self.showRunning("segment", _("Writing the volume and starting the model..."))

    # --- progress, under the button that started the run ---

    def runWidgets(self, kind: str) -> Tuple[Any, Any, Any]:
        """The progress bar, status line and Show log button of a run of this kind ('segment', 'import' or
        'train')."""
        if kind == "train":
            return self.ui.retrainProgressBar, self.ui.retrainStatusLabel, self.ui.retrainShowLogButton
        return self.ui.progressBar, self.ui.statusLabel, self.ui.showLogButton

    def cancelRun(self) -> None:
        """Returns at once; the timer notices when the process tree has ended."""
        self.cancelling = True
        self.logic.cancel()
        self.runWidgets(self.runningKind)[1].text = _("Cancelling...")
        self.updateButtons()

    def showRunning(self, kind: str, text: str) -> None:
        self.cancelling = False
        self.runningKind = kind
        progressBar, statusLabel, showLogButton = self.runWidgets(kind)
        progressBar.show()
        progressBar.setRange(0, 0)  # busy until the first progress record
        statusLabel.text = text
        showLogButton.enabled = True
        self.updateButtons()
        self.timer.start()

    def onTimer(self) -> None:
        """Every 200 ms: drain the progress records (never blocks), finish when the child has ended."""
        devices = self.logic.foundDevices()
        if devices:
            self.addDevices(devices)
        for record in self.logic.pollProgress():
            self.showProgress(record)
        finished = self.logic.finishedRun()
        if finished is not None:
            self.showFinished(*finished)
        if not self.logic.unfinished() and not self.logic.probing():
            self.timer.stop()

    def showProgress(self, record: dict) -> None:
        if self.cancelling:
            return
        progressBar, statusLabel, _showLogButton = self.runWidgets(self.runningKind)
        total, done = int(record.get("total") or 0), int(record.get("done") or 0)
        if total > 0:
            progressBar.setRange(0, total)
            progressBar.setValue(min(max(done, 0), total))
        statusLabel.text = progressText(record)

    def showFinished(self, kind: str, state: str, message: str) -> None:
        self.cancelling = False
        self.logs[kind] = self.logic.logText()
        progressBar, statusLabel, _showLogButton = self.runWidgets(kind)
        if state == SUCCEEDED:
            progressBar.setRange(0, 1)  # full, beside "Done", until the next run
            progressBar.setValue(1)
        else:
            progressBar.hide()
        if state == SUCCEEDED and kind == "train":
            self.refreshModels(select=Path(message))
            statusLabel.text = _("New model '{model}' trained and selected in the model list.").format(
                model=modelLabel(Path(message))
            )
        elif state == SUCCEEDED and kind == "import":
            self.refreshModels(select=Path(message))
            statusLabel.text = _("Model '{model}' imported and selected in the model list.").format(
                model=modelLabel(Path(message))
            )
        elif state == SUCCEEDED:
            if self._parameterNode and self._parameterNode.outputSegmentation is None:
                self._parameterNode.outputSegmentation = self.logic.resultNode  # the node made for the result
            statusLabel.text = message
        elif state == CANCELLED:
            statusLabel.text = _("Cancelled.")
        else:
            statusLabel.text = _("Failed: {message}").format(message=message)
            slicer.util.errorDisplay(
                _("MedSegUNet {kind} failed:\n{message}").format(kind=kind, message=message),
                detailedText=self.logic.logText(),
            )
        self.updateButtons()
        self.prepareEngine()  # for the next click

    def onShowSegmentLog(self) -> None:
        self.showLog("segment")

    def onShowRetrainLog(self) -> None:
        self.showLog("train")

    def showLog(self, kind: str) -> None:
        """The run of this kind that is going, else the latest one that ended."""
        going = self.logic.unfinished() and self.runningKind == kind
        text = self.logic.logText() if going else self.logs.get(kind, "")
        slicer.util.infoDisplay(
            _("Output of the latest MedSegUNet Segment run:")
            if kind == "segment"
            else _("Output of the latest MedSegUNet Retrain run:"),
            _("MedSegUNet log"),
            detailedText=text or _("(empty)"),
        )

    # --- Retrain ---

    def refreshCases(self) -> None:
        """This scene's annotated pairs (new ones checked), then the scene files added before; checks are kept."""
        listed = self.ui.casesListWidget
        entries = [listed.item(i) for i in range(listed.count)]
        checked = {
            e.data(qt.Qt.UserRole) or e.data(qt.Qt.UserRole + 1): e.checkState() == qt.Qt.Checked for e in entries
        }
        files = [e.data(qt.Qt.UserRole) for e in entries if e.data(qt.Qt.UserRole)]
        listed.clear()
        for volume, segmentation in self.logic.annotatedPairs():
            entry = self.addCaseItem(
                f"{volume.GetName()}  +  {segmentation.GetName()}", checked.get(segmentation.GetID(), True)
            )
            entry.setData(qt.Qt.UserRole + 1, segmentation.GetID())
        for path in files:
            self.addFileItem(path, checked[path])

    def addCaseItem(self, text: str, checked: bool):
        entry = qt.QListWidgetItem(text)
        entry.setFlags(entry.flags() | qt.Qt.ItemIsUserCheckable)
        entry.setCheckState(qt.Qt.Checked if checked else qt.Qt.Unchecked)
        self.ui.casesListWidget.addItem(entry)
        return entry

    def addFileItem(self, path: str, checked: bool = True) -> None:
        entry = self.addCaseItem(Path(path).name + ("/" if Path(path).is_dir() else ""), checked)
        entry.setData(qt.Qt.UserRole, path)
        entry.setToolTip(path)

    def onAddScenes(self) -> None:
        paths = qt.QFileDialog.getOpenFileNames(
            self.parent, _("Annotated Slicer scenes"), "", _("Slicer scenes (*.mrb *.mrml)")
        )
        for path in paths:
            self.addFileItem(path)

    def onAddFolder(self) -> None:
        path = qt.QFileDialog.getExistingDirectory(self.parent, _("A folder of annotated scenes (.mrb)"))
        if path:
            self.addFileItem(path)

    def checkedCases(self):
        """(segmentation nodes of this scene, scene files and folders) that are checked."""
        nodes, files = [], []
        listed = self.ui.casesListWidget
        for entry in [listed.item(i) for i in range(listed.count)]:
            if entry.checkState() != qt.Qt.Checked:
                continue
            if entry.data(qt.Qt.UserRole):
                files.append(Path(entry.data(qt.Qt.UserRole)))
            elif slicer.mrmlScene.GetNodeByID(entry.data(qt.Qt.UserRole + 1)):
                nodes.append(slicer.mrmlScene.GetNodeByID(entry.data(qt.Qt.UserRole + 1)))
        return nodes, files

    def onRetrainButton(self) -> None:
        if self.logic.busy() == "train":
            self.cancelRun()
            return
        segmentations, files = self.checkedCases()
        if not segmentations and not files:
            slicer.util.warningDisplay(
                _("Check at least one annotated case: a volume with its segmentation, or a scene file.")
            )
            return
        parameters = self._parameterNode
        init = None if parameters.retrainFromScratch else self.currentModel()
        if not parameters.retrainFromScratch and init is None:
            slicer.util.warningDisplay(_("Select the model to fine-tune, or check 'Train from scratch'."))
            return
        if init is not None and self.logic.isModelSet(init):
            slicer.util.warningDisplay(_("A model set is not fine-tuned as one: select one of its models."))
            return
        if not self.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start training."), waitCursor=True):
            self.logic.startTrain(
                segmentations,
                files,
                init,
                parameters.retrainMinutes,
                self.ui.deviceComboBox.currentData,
                parameters.retrainSteps or None,
            )
            self.showRunning("train", _("Saving the annotated cases and starting training..."))

    # --- dependencies ---

    def ensureDependencies(self) -> bool:
        """On first use: offer to install what the engine needs (asks first; never at Slicer start-up)."""
        missing = self.logic.dependenciesMissing()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            _(
                "MedSegUNet needs these Python packages, which are not installed in Slicer yet:\n{packages}\n\n"
                "Install them now? This downloads up to a few GB (PyTorch) and takes a few minutes."
            ).format(packages=", ".join(missing)),
            _("MedSegUNet: install dependencies"),
        ):
            return False
        with slicer.util.tryWithErrorDisplay(_("Installing the dependencies failed."), waitCursor=True):
            self.logic.installDependencies(missing)
        still = self.logic.dependenciesMissing()
        if still:
            slicer.util.errorDisplay(
                _("Still missing after the installation: {packages}. Restart Slicer and try again.").format(
                    packages=", ".join(still)
                )
            )
            return False
        self.probeDevices()
        return True


def progressText(record: dict) -> str:
    """One status line from a progress record: the stage, the engine's message, the time left."""
    text = f"{str(record.get('stage', '')).capitalize()}: {record.get('message', '')}".rstrip(": ")
    eta = record.get("eta_s")
    if isinstance(eta, (int, float)) and eta > 0:
        text += " " + _("(about {minutes} min {seconds} s left)").format(minutes=int(eta // 60), seconds=int(eta % 60))
    return text


@dataclass
class PendingRun:
    """What the end of a run needs: Segment's volume, result file and model; Retrain's output folder."""

    volumeNode: Any = None  # vtkMRMLScalarVolumeNode
    outputNode: Any = None  # vtkMRMLSegmentationNode to fill; None: a new one
    surfaces: bool = False  # make closed surfaces for the 3D view
    outputPath: Optional[Path] = None
    model: Optional[Path] = None
    output: Optional[Path] = None


# --- Slicer glue -----------------------------------------------------------------------------------


class MedSegUNetLogic(ScriptedLoadableModuleLogic):
    """Nodes to files and back, and one engine run at a time. All process handling is childprocess.py's."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.run: Optional[ChildProcess] = None
        self.runKind: Optional[str] = None
        self.deviceProbe: Optional[ChildProcess] = None
        self.devicesReported = False
        self.workFolder: Optional[tempfile.TemporaryDirectory] = None
        self.pending = PendingRun()
        self.lastLog = ""
        self.userModelsKey = USER_MODELS_KEY  # the self-test uses a key of its own
        self.standby: Optional[StandbyEngine] = None  # the engine waiting for the next Segment
        self.lastRunWasReady = False  # the last Segment ran on the waiting engine
        self.trainedModelsRoot: Optional[Path] = None  # default: beside Slicer's settings
        self.resultNode = None  # the segmentation node the last Segment filled

    def getParameterNode(self):
        return MedSegUNetParameterNode(super().getParameterNode())

    # --- models ---

    @staticmethod
    def shippedModels() -> List[Path]:
        """Bundles in the module's Resources/Models (installed extension) or the checkout's Resources/Models."""
        from MedSegUNetLib.model.shipped import shipped_models

        return shipped_models()

    def availableModels(self) -> List[Path]:
        seen, models = set(), []
        for path in self.shippedModels() + [Path(p) for p in self.rememberedModels()]:
            if path.is_file() and path.resolve() not in seen:
                seen.add(path.resolve())
                models.append(path)
        return models

    def rememberedModels(self) -> List[str]:
        value = qt.QSettings().value(self.userModelsKey)
        if not value:
            return []
        return [value] if isinstance(value, str) else [str(v) for v in value]

    def rememberModel(self, path: Path) -> None:
        models = [p for p in self.rememberedModels() if p != str(path)] + [str(path)]
        qt.QSettings().setValue(self.userModelsKey, models)

    @staticmethod
    def describeModel(path: Path) -> str:
        """The model in words, from the bundle's header (no torch needed): the one line the panel shows under
        the model list, then its details (every structure with its validation Dice and 95% Hausdorff distance,
        the input it expects, how it was trained)."""
        from MedSegUNetLib.model.bundle import read_bundle_metadata
        from MedSegUNetLib.model.model_set import is_model_set, read_model_set

        if is_model_set(path):
            modelSet = read_model_set(path)
            metas = [read_bundle_metadata(member) for member in modelSet.models]
            return modelSetText(modelSet.name, metas, modelSet.models)
        meta = read_bundle_metadata(path)
        return modelSummary(meta, path) + "\n" + modelDetails(meta, path)

    @staticmethod
    def modelOverlap(path: Path) -> float:
        """The window overlap the model runs with when none is given: an imported model's own (a set: its
        first model's), else the engine's default."""
        from MedSegUNetLib.model.bundle import read_bundle_metadata
        from MedSegUNetLib.model.model_set import is_model_set, read_model_set

        first = read_model_set(path).models[0] if is_model_set(path) else path
        return read_bundle_metadata(first).run_overlap

    @staticmethod
    def isModelSet(path: Path) -> bool:
        from MedSegUNetLib.model.model_set import is_model_set

        return is_model_set(path)

    def createModelSet(self, name: str, models: List[Path]) -> Path:
        """A model set of ``models`` (in order of precedence) in the imported models folder, remembered and
        listed; every model is checked as a bundle first."""
        from MedSegUNetLib.model.model_set import SUFFIX, write_model_set

        for model in models:
            self.describeModel(model)  # a pickle or another file is refused before the set is written
        stem = "".join(c if c.isalnum() or c in "-_ " else "_" for c in name).strip() or "models"
        path = self.importedModelsFolder() / f"{stem}{SUFFIX}"
        if path.exists():
            path = self.importedModelsFolder() / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}{SUFFIX}"
        write_model_set(path, name, models)
        self.describeModel(path)
        self.rememberModel(path)
        return path

    # --- dependencies ---

    @staticmethod
    def dependenciesMissing() -> List[str]:
        """Distributions whose module Slicer's Python cannot find (checked without importing them)."""
        importlib.invalidate_caches()
        names = [distributionName(r) for r in [TORCH_REQUIREMENT] + ENGINE_REQUIREMENTS]
        return [name for name in names if importlib.util.find_spec(IMPORT_NAMES.get(name, name)) is None]

    @staticmethod
    def installDependencies(missing: List[str]) -> None:
        """torch through the PyTorch extension when it is installed (it picks the CUDA build), the rest with pip."""
        if "torch" in missing:
            if importlib.util.find_spec("PyTorchUtils") is not None:
                import PyTorchUtils

                # The panel asked already; PyTorchUtils chooses the build that fits the GPU driver.
                versions = TORCH_REQUIREMENT[len("torch") :]
                if (
                    PyTorchUtils.PyTorchUtilsLogic().installTorch(
                        askConfirmation=False, torchVersionRequirement=versions
                    )
                    is None
                ):
                    raise RuntimeError(_("PyTorch was not installed."))
            else:
                slicer.util.pip_install([TORCH_REQUIREMENT])
        wanted = [r for r in ENGINE_REQUIREMENTS if distributionName(r) in missing]
        if wanted:
            # torch held at the installed build: dynamic-network-architectures pulls timm and torchvision,
            # and pip would otherwise replace torch (e.g. a CUDA build) to fit the newest torchvision.
            importlib.invalidate_caches()
            held = f"torch=={importlib.metadata.version('torch')}"
            slicer.util.pip_install(wanted + [held])  # a list: no shell quoting of the version ranges
        importlib.invalidate_caches()

    # --- devices ---

    @staticmethod
    def devicesIfTorchLoaded() -> Optional[List[Tuple[str, str]]]:
        """The GPUs, when torch is imported in Slicer already (by another module); None otherwise."""
        torch = sys.modules.get("torch")
        if torch is None:
            return None
        cuda = (
            [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available()
            else []
        )
        mps = getattr(torch.backends, "mps", None)
        return devices_from_names(cuda, bool(mps and mps.is_available()))

    def startDeviceProbe(self) -> bool:
        if self.deviceProbe is not None:
            return False
        self.deviceProbe = ChildProcess(devices_command(), engine_environment(MODULE_DIR))
        return True

    def probing(self) -> bool:
        return self.deviceProbe is not None and self.deviceProbe.state == RUNNING

    def foundDevices(self) -> List[Tuple[str, str]]:
        """The GPUs the probe found, once, when it has ended (a failed probe finds none)."""
        if self.deviceProbe is None or self.devicesReported or self.deviceProbe.state == RUNNING:
            return []
        self.devicesReported = True
        return parse_devices(self.deviceProbe.log_lines)

    # --- runs ---

    def busy(self) -> Optional[str]:
        """'segment' or 'train' while a run is going, else None."""
        return self.runKind if self.run is not None and self.run.state == RUNNING else None

    def unfinished(self) -> bool:
        """A run was started and finishedRun() has not reported its end yet."""
        return self.runKind is not None

    def cancel(self) -> None:
        if self.run is not None and self.run.state == RUNNING:
            self.run.cancel()

    def pollProgress(self) -> List[dict]:
        return self.run.poll() if self.run is not None else []

    def logText(self) -> str:
        return self.run.log_text() if self.run is not None else self.lastLog

    def newWorkFolder(self) -> Path:
        if self.workFolder is not None:
            self.workFolder.cleanup()
        self.workFolder = tempfile.TemporaryDirectory(prefix="MedSegUNet-", dir=slicer.app.temporaryPath)
        return Path(self.workFolder.name)

    def ensureIdle(self) -> None:
        """One run at a time (checked before anything is written: the running one's folder stays)."""
        if self.busy():
            raise RuntimeError(_("A {kind} run is still going.").format(kind=self.busy()))

    def startRun(self, kind: str, command: List[str], device: Optional[str], pending: "PendingRun") -> None:
        self.ensureIdle()
        run = ChildProcess(command, engine_environment(MODULE_DIR, device=device))  # raises if it cannot start
        self.run, self.pending, self.runKind = run, pending, kind
        logging.info("MedSegUNet: %s", " ".join(command))

    # --- nodes to files ---

    @staticmethod
    def writeVolume(volumeNode, path: Path) -> Path:
        return nodefiles.write_volume(volumeNode, path)

    @staticmethod
    def referenceVolume(segmentationNode):
        return segments.reference_volume(segmentationNode)

    # --- Segment ---

    @staticmethod
    def segmentRequest(
        inputPath: Path,
        model: Path,
        outputPath: Path,
        device: str,
        overlap: Optional[float],
        tta: bool,
        largest: bool,
    ) -> SegmentRequest:
        """What Segment asks of the engine: its command line, or the waiting engine's job (tested outside
        Slicer). overlap None: each model's own."""
        return SegmentRequest([inputPath], model, outputPath, device or "auto", overlap, tta, largest)

    def startSegment(
        self,
        volumeNode,
        outputNode,
        model: Path,
        device: str,
        overlap: Optional[float],
        tta: bool,
        largest: bool,
        surfaces: bool = False,
    ) -> None:
        """Segment volumeNode into outputNode (None: a new node, made when the result arrives); overlap None
        runs each model with its own (modelOverlap)."""
        self.ensureIdle()
        folder = self.newWorkFolder()
        inputPath = self.writeVolume(volumeNode, folder / "input.nrrd")
        request = self.segmentRequest(inputPath, model, folder / "result.seg.nrrd", device, overlap, tta, largest)
        pending = PendingRun(volumeNode, outputNode, surfaces, outputPath=request.output, model=model)
        self.resultNode = None
        standby, self.standby = self.standby, None
        run = standby.take(request) if standby is not None else None
        self.lastRunWasReady = run is not None
        if run is None:
            if standby is not None:
                standby.stop()  # another model or device: it would only hold memory
            self.startRun("segment", segment_command(request), device, pending)
        else:
            self.run, self.pending, self.runKind = run, pending, "segment"
            logging.info("MedSegUNet: segment on the waiting engine: %s", " ".join(segment_arguments(request)))

    # --- the engine kept ready for the next Segment ---

    def keepEngineReady(self) -> bool:
        value = qt.QSettings().value(KEEP_READY_KEY, True)
        return value not in (False, "false", "0", 0)  # QSettings hands back strings from an .ini file

    def setKeepEngineReady(self, keep: bool) -> None:
        qt.QSettings().setValue(KEEP_READY_KEY, bool(keep))
        if not keep:
            self.stopStandby()

    def prepareStandby(self, model: Optional[Path], device: Optional[str]) -> bool:
        """Start the engine for the next Segment with this model and device (StandbyEngine in childprocess.py),
        unless one that fits is waiting, a run is going (it would slow the run down), the setting is off or
        the engine's libraries are not installed yet. True when one fits now."""
        if model and self.standby is not None and self.standby.fits(model, device):
            return True
        self.stopStandby()
        if not model or not self.keepEngineReady() or self.busy() or self.dependenciesMissing():
            return False
        if self.isModelSet(model):  # the waiting engine holds one bundle; Segment starts a fresh one for a set
            return False
        self.standby = StandbyEngine(model, device, engine_environment(MODULE_DIR, device=device))
        logging.info("MedSegUNet: engine started ahead for %s on %s", model.name, device or "auto")
        return True

    def stopStandby(self) -> None:
        if self.standby is not None:
            self.standby.stop()
            self.standby = None

    # --- Retrain ---

    def trainCommand(
        self,
        data: List[Path],
        output: Path,
        init: Optional[Path],
        minutes: Optional[float],
        device: str,
        maxSteps: Optional[int] = None,
    ) -> List[str]:
        """The exact command line Retrain runs (tested outside Slicer)."""
        return train_command(TrainRequest(data, output, init, minutes, maxSteps, device or "auto"))

    def trainedModelsFolder(self) -> Path:
        root = self.trainedModelsRoot or Path(slicer.app.slicerUserSettingsFilePath).parent / "MedSegUNet" / "models"
        root.mkdir(parents=True, exist_ok=True)
        return root

    # --- Add model: another tool's model ---

    def importedModelsFolder(self) -> Path:
        folder = self.trainedModelsFolder().parent / "imported"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def startImport(self, source: Path) -> Path:
        """Write a bundle from an nnU-Net results folder or .zip, or a MONAI bundle, in a child process;
        returns where the bundle will be (a new file: an earlier import is never overwritten)."""
        self.ensureIdle()
        stem = source.name[: -len(".zip")] if source.name.lower().endswith(".zip") else source.name
        output = self.importedModelsFolder() / f"{stem or 'model'}-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
        self.startRun("import", import_command(source, output), None, PendingRun(output=output))
        return output

    def finishImport(self, run: ChildProcess) -> str:
        bundle = Path((run.result or {}).get("output") or self.pending.output or "")
        if not bundle.is_file():
            raise FileNotFoundError(_("The import reported {bundle}, which does not exist.").format(bundle=bundle))
        self.describeModel(bundle)  # a bundle the panel can read, before it is listed
        self.rememberModel(bundle)
        return str(bundle)

    def saveAnnotatedScene(self, segmentationNodes, folder: Path) -> Optional[Path]:
        """The checked (volume, segmentation) pairs as a scene that `training` reads: folder/scene/annotations.mrml."""
        return annotations.save_annotated_scene(segmentationNodes, folder)

    def startTrain(
        self,
        segmentationNodes,
        sceneFiles: List[Path],
        init: Optional[Path],
        minutes: Optional[float],
        device: str,
        maxSteps: Optional[int] = None,
    ) -> None:
        """Save the checked pairs as a scene, then train in a child process; the bundle lands in the models folder."""
        self.ensureIdle()
        self.stopStandby()  # training wants the memory; the panel starts another engine when it ends
        folder = self.newWorkFolder()
        scene = self.saveAnnotatedScene(segmentationNodes, folder)
        data = ([scene] if scene else []) + [Path(p) for p in sceneFiles]
        output = self.trainedModelsFolder() / time.strftime("model-%Y%m%d-%H%M%S")
        command = self.trainCommand(data, output, init, minutes, device, maxSteps)
        self.startRun("train", command, device, PendingRun(output=output))

    # --- the end of a run ---

    def finishedRun(self):
        """(kind, state, message) once, when a run has ended; a segmentation result is loaded here."""
        if self.run is None or not self.runKind or self.run.state == RUNNING:
            return None
        kind, state, run = self.runKind, self.run.state, self.run
        self.runKind, self.lastLog = None, run.log_text()
        message = run.error_message if state == FAILED else ""
        try:
            if state == SUCCEEDED and kind == "segment":
                message = self.finishSegment()
            elif state == SUCCEEDED and kind == "train":
                message = self.finishTrain(run)
            elif state == SUCCEEDED and kind == "import":
                message = self.finishImport(run)
        except Exception as error:  # report in the panel; the engine itself succeeded
            logging.exception("MedSegUNet: could not take over the result")
            state, message = FAILED, f"could not take over the result: {error}"
        return kind, state, message

    def finishSegment(self) -> str:
        pending = self.pending
        if pending.outputPath is None or pending.volumeNode is None or pending.model is None:
            raise RuntimeError(_("The finished Segment run left no result to take over."))
        self.resultNode = self.loadResult(
            pending.outputPath, pending.volumeNode, pending.outputNode, pending.model, pending.surfaces
        )
        return _("Done: {count} segments in '{name}'.").format(
            count=self.resultNode.GetSegmentation().GetNumberOfSegments(), name=self.resultNode.GetName()
        )

    def finishTrain(self, run: ChildProcess) -> str:
        reported = (run.result or {}).get("bundle")
        if not reported and self.pending.output is None:
            raise RuntimeError(_("Training reported no model bundle."))
        bundle = Path(reported or Path(self.pending.output) / "model.safetensors")
        if not bundle.is_file():
            raise FileNotFoundError(_("Training reported {bundle}, which does not exist.").format(bundle=bundle))
        self.rememberModel(bundle)
        return str(bundle)

    # --- files to nodes ---

    @staticmethod
    def annotatedPairs():
        """(volume, segmentation) pairs of the scene: segmentations with segments, tied to a volume."""
        return segments.annotated_pairs(slicer.mrmlScene)

    @staticmethod
    def segmentNames(segmentationNode) -> List[str]:
        return segments.segment_names(segmentationNode)

    def segmentsToReplace(self, segmentationNode, model: Path) -> List[str]:
        """Segments of an existing output that Segment would replace (same name as a model structure)."""
        from MedSegUNetLib.model.bundle import read_bundle_metadata
        from MedSegUNetLib.model.model_set import expand_models

        names = {label.name.casefold() for m in expand_models([model]) for label in read_bundle_metadata(m).labels}
        return [name for name in self.segmentNames(segmentationNode) if name.casefold() in names]

    @staticmethod
    def loadResult(path: Path, volumeNode, outputNode, model: Path, surfaces: bool):
        """The engine's .seg.nrrd segments (names, colors, terminology) into outputNode (None, or a node
        deleted meanwhile: a new one), on the volume; returns the node filled."""
        return segments.take_over_result(path, volumeNode, outputNode, model, surfaces)

    @staticmethod
    def showIn3D(segmentationNode, show: bool) -> None:
        """Make (or drop) the closed surfaces that the 3D view shows."""
        if show:
            segmentationNode.CreateClosedSurfaceRepresentation()
        else:
            segmentationNode.RemoveClosedSurfaceRepresentation()

    # --- blocking forms, for the self-test and scripts ---

    def segmentAndWait(
        self,
        volumeNode,
        model: Path,
        device: str = "cpu",
        timeoutSeconds: float = 600,
        cancelAfterFirstProgress: bool = False,
        tta: bool = False,
        outputNode=None,
    ):
        self.startSegment(volumeNode, outputNode, model, device, 0.25, tta, True)
        return self.waitForEnd(timeoutSeconds, cancelAfterFirstProgress)

    def trainAndWait(self, segmentationNodes, init: Optional[Path], maxSteps: int, timeoutSeconds: float = 900):
        self.startTrain(segmentationNodes, [], init, None, "cpu", maxSteps)
        return self.waitForEnd(timeoutSeconds, False)

    def importAndWait(self, source: Path, timeoutSeconds: float = 600):
        self.startImport(source)
        return self.waitForEnd(timeoutSeconds, False)

    def waitForEnd(self, timeoutSeconds: float, cancelAfterFirstProgress: bool = False):
        """Runs the event loop while waiting (Slicer stays responsive); returns finishedRun()'s triple."""
        deadline = time.monotonic() + timeoutSeconds
        while time.monotonic() < deadline:
            slicer.app.processEvents()
            if self.pollProgress() and cancelAfterFirstProgress:
                self.cancel()
            finished = self.finishedRun()
            if finished is not None:
                return finished
            time.sleep(0.05)
        self.cancel()
        raise TimeoutError(
            _("The engine did not finish within {seconds} s:").format(seconds=timeoutSeconds)
            + "\n"
            + self.logText()[-2000:]
        )


# --- self-test, run inside Slicer --------------------------------------------------------------------


class MedSegUNetTest(ScriptedLoadableModuleTest):
    """Segment a synthetic oblique volume, through the logic and through the panel; cancel; retrain.

    Uses a shipped model when there is one, else makes a small untrained bundle with the engine's
    create-bundle command (its output is noise, but names, colors and geometry are checked all the same).
    Run: Slicer --no-splash --no-main-window --python-code "import MedSegUNet; MedSegUNet.MedSegUNetTest.runAndExit()"
    or the extension's ctest (py_MedSegUNet), or Reload and Test in the module's developer section.
    """

    TEST_MODELS_KEY = "MedSegUNet/SelfTestModels"

    @classmethod
    def runAndExit(cls) -> None:
        """Every test_ method; Slicer exits with 0 when all passed, 1 otherwise (for CI)."""
        import unittest

        result = unittest.TextTestRunner(verbosity=2).run(unittest.defaultTestLoader.loadTestsFromTestCase(cls))
        slicer.util.exit(0 if result.wasSuccessful() else 1)

    def setUp(self):
        slicer.mrmlScene.Clear()
        parameters = MedSegUNetLogic().getParameterNode()  # one parameter node per scene, shared
        parameters.inputVolume = None
        parameters.outputSegmentation = None

    def tearDown(self):
        qt.QSettings().remove(self.TEST_MODELS_KEY)

    def runTest(self):
        for name in [name for name in type(self).__dict__ if name.startswith("test_")]:  # in the order written
            test = getattr(self, name)
            self.setUp()
            try:
                test()
            finally:
                self.tearDown()
        self.delayDisplay("MedSegUNet self-test passed")

    # --- helpers ---

    def newLogic(self) -> MedSegUNetLogic:
        logic = MedSegUNetLogic()
        logic.userModelsKey = self.TEST_MODELS_KEY  # the user's model list is not touched
        logic.trainedModelsRoot = Path(slicer.app.temporaryPath) / "MedSegUNetTest" / "models"
        return logic

    def model(self) -> Path:
        shipped = MedSegUNetLogic.shippedModels()
        return shipped[0] if shipped else self.createdModel()

    def createdModel(self, labels: str = "organ,rim", name: str = "selftest") -> Path:
        path = Path(slicer.app.temporaryPath) / "MedSegUNetTest" / f"{name}.safetensors"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            command = [
                engine_python(),
                "-m",
                "MedSegUNetLib",
                "create-bundle",
                "-o",
                str(path),
                "--labels",
                labels,
                "--spacing",
                "3",
                "3",
                "3",
                "--patch-size",
                "32",
                "32",
                "16",
                "--filters",
                "4",
            ]
            run = ChildProcess(command, engine_environment(MODULE_DIR))
            self.assertEqual(run.wait(timeout=300), SUCCEEDED, run.log_text())
        return path

    def syntheticVolume(self):
        """A CT-like volume with a bright 'organ', from numpy (no download), on an oblique grid."""
        import numpy as np

        rng = np.random.default_rng(0)
        array = rng.normal(-80, 20, (40, 96, 112)).astype(np.int16)  # KJI order, as slicer.util expects
        k, j, i = np.ogrid[:40, :96, :112]
        array[((k - 20) / 12.0) ** 2 + ((j - 48) / 30.0) ** 2 + ((i - 50) / 34.0) ** 2 <= 1] = 60
        angle = np.deg2rad(20)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        ijkToRAS = np.eye(4)
        ijkToRAS[:3, :3] = rotation @ np.diag([1.5, 1.5, 3.0])
        ijkToRAS[:3, 3] = [-80.0, 40.0, -20.0]
        volume = slicer.util.addVolumeFromArray(array, ijkToRAS=ijkToRAS, name="MedSegUNet test volume")
        return volume, array

    def assertOnVolumeGrid(self, segmentationNode, segmentId, volumeNode):
        """The segment's labelmap has the volume's axes and spacing, shifted by whole voxels at most."""
        import numpy as np

        labelmap = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
        self.assertIsNotNone(labelmap)
        imageToWorld, ijkToRAS = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(imageToWorld)
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        relative = np.linalg.inv(slicer.util.arrayFromVTKMatrix(ijkToRAS)) @ slicer.util.arrayFromVTKMatrix(
            imageToWorld
        )
        np.testing.assert_allclose(relative[:3, :3], np.eye(3), atol=1e-4)
        np.testing.assert_allclose(relative[:3, 3], np.round(relative[:3, 3]), atol=1e-3)

    def waitWhileBusy(self, logic, timeoutSeconds: float = 600) -> None:
        deadline = time.monotonic() + timeoutSeconds
        while logic.unfinished():
            self.assertLess(time.monotonic(), deadline, logic.logText()[-2000:])
            slicer.app.processEvents()  # the panel's timer runs here
            time.sleep(0.05)

    # --- tests ---

    def test_dependencies_and_model(self):
        self.delayDisplay("Dependencies and the model")
        logic = self.newLogic()
        self.assertEqual(
            logic.dependenciesMissing(), [], "install the dependencies (the panel offers it) before the self-test"
        )
        from MedSegUNetLib.model.bundle import read_bundle_metadata

        description = logic.describeModel(self.model())
        for label in read_bundle_metadata(self.model()).labels:
            self.assertIn(label.name, description)

    def test_segment_fills_a_segmentation_on_the_volume_grid(self):
        self.delayDisplay("Segment")
        from MedSegUNetLib.model.bundle import read_bundle_metadata

        volume, array = self.syntheticVolume()
        logic = self.newLogic()
        kind, state, message = logic.segmentAndWait(volume, self.model())
        self.assertEqual((kind, state), ("segment", SUCCEEDED), f"{message}\n{logic.logText()}")
        node = logic.resultNode
        self.assertIsNotNone(node)
        self.assertEqual(slicer.util.getNodesByClass("vtkMRMLSegmentationNode"), [node])  # a new node, in the scene
        labels = read_bundle_metadata(self.model()).labels
        self.assertEqual(logic.segmentNames(node), [label.name for label in labels])  # every label, in order
        self.assertEqual(logic.referenceVolume(node).GetID(), volume.GetID())
        segmentation = node.GetSegmentation()
        for index, label in enumerate(labels):
            segmentId = segmentation.GetNthSegmentID(index)
            for got, expected in zip(segmentation.GetSegment(segmentId).GetColor(), label.color):  # both 0..1
                self.assertAlmostEqual(got, expected, places=2)
            self.assertEqual(slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentId, volume).shape, array.shape)
            self.assertOnVolumeGrid(node, segmentId, volume)
        self.assertEqual(node.GetAttribute("MedSegUNet.Model"), str(self.model()))
        self.assertIsNone(logic.busy())
        self.assertFalse(segmentation.ContainsRepresentation("Closed surface"))  # 3D surfaces on request only
        logic.showIn3D(node, True)
        self.assertTrue(segmentation.ContainsRepresentation("Closed surface"))

        # Again into the same node: same segments replaced in place, a user's own segment kept.
        segmentation.AddEmptySegment("my notes")
        kind, state, message = logic.segmentAndWait(volume, self.model(), outputNode=node)
        self.assertEqual(state, SUCCEEDED, message)
        self.assertIs(logic.resultNode, node)
        self.assertEqual(logic.segmentNames(node), [label.name for label in labels] + ["my notes"])

    def test_add_model_imports_an_nnunet_model(self):
        self.delayDisplay("Add model: an nnU-Net results folder")
        from MedSegUNetLib.model.bundle import read_bundle_metadata

        logic = self.newLogic()
        folder = Path(slicer.app.temporaryPath) / "MedSegUNetTest" / "no model here"
        folder.mkdir(parents=True, exist_ok=True)
        kind, state, message = logic.importAndWait(folder)
        self.assertEqual((kind, state), ("import", FAILED), logic.logText())
        self.assertIn("no model here", message)  # one line that names the folder
        self.assertNotIn("\n", message.strip())
        self.assertFalse(qt.QSettings().value(self.TEST_MODELS_KEY))  # nothing remembered

        kind, state, message = logic.importAndWait(self.smallNnunetModel())
        self.assertEqual((kind, state), ("import", SUCCEEDED), f"{message}\n{logic.logText()}")
        bundle = Path(message)
        self.assertTrue(bundle.is_file())
        self.assertEqual(bundle.parent, logic.importedModelsFolder())
        self.assertIn(bundle, logic.availableModels())
        meta = read_bundle_metadata(bundle)
        self.assertEqual([label.name for label in meta.labels], ["organ"])
        self.assertEqual(meta.provenance["source"]["format"], "nnU-Net v2")
        volume, _ = self.syntheticVolume()
        kind, state, message = logic.segmentAndWait(volume, bundle)
        self.assertEqual((kind, state), ("segment", SUCCEEDED), f"{message}\n{logic.logText()}")
        self.assertEqual(logic.segmentNames(logic.resultNode), ["organ"])

    def test_add_model_imports_a_monai_segresnet_bundle(self):
        self.delayDisplay("Add model: a MONAI bundle (SegResNet, wholeBody_ct_segmentation's layout)")
        from MedSegUNetLib.core.anatomy import known_label
        from MedSegUNetLib.model.bundle import read_bundle_metadata

        logic = self.newLogic()
        kind, state, message = logic.importAndWait(self.smallMonaiBundle())
        self.assertEqual((kind, state), ("import", SUCCEEDED), f"{message}\n{logic.logText()}")
        meta = read_bundle_metadata(Path(message))
        self.assertEqual(meta.labels, [known_label(1, "liver"), known_label(2, "spleen")])  # Slicer's terminology
        self.assertEqual((meta.network.cls, meta.padding), ("SegResNet", "replicate"))
        self.assertEqual(meta.preprocessing.target_spacing, (3.0, 3.0, 3.0))  # the $ expression, highres false
        self.assertEqual(meta.provenance["source"]["format"], "monai-bundle")
        volume, array = self.syntheticVolume()  # thinner than the 64-voxel window on every axis at 3 mm
        kind, state, message = logic.segmentAndWait(volume, Path(message))
        self.assertEqual((kind, state), ("segment", SUCCEEDED), f"{message}\n{logic.logText()}")
        node = logic.resultNode
        self.assertEqual(logic.segmentNames(node), ["liver", "spleen"])
        for index in range(2):
            segmentId = node.GetSegmentation().GetNthSegmentID(index)
            self.assertOnVolumeGrid(node, segmentId, volume)

    def smallMonaiBundle(self) -> Path:
        """A bundle folder laid out as the Model Zoo's wholeBody_ct_segmentation (configs with $ expressions
        the importer computes or leaves unread, a CheckpointLoader naming the weights file), a small SegResNet
        with seeded weights."""
        import json
        import shutil

        import torch
        from monai.networks.nets import SegResNet

        folder = Path(slicer.app.temporaryPath) / "MedSegUNetTest" / "wholeBody_like"
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "configs").mkdir(parents=True)
        (folder / "models").mkdir()
        network = {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "init_filters": 8}
        config = {
            "displayable_configs": {"highres": False},
            "bundle_root": ".",
            "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
            "pixdim": "$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]",
            "modelname": "$'model.pt' if @displayable_configs#highres else 'model_lowres.pt'",
            "network_def": network,
            "preprocessing": {
                "_target_": "Compose",
                "transforms": [
                    {"_target_": "LoadImaged", "keys": "image"},
                    {"_target_": "EnsureChannelFirstd", "keys": "image"},
                    {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                    {"_target_": "Spacingd", "keys": "image", "pixdim": "@pixdim", "mode": "bilinear"},
                    {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True},
                    {"_target_": "ScaleIntensityd", "keys": "image", "minv": -1.0, "maxv": 1.0},
                ],
            },
            "inferer": {
                "_target_": "SlidingWindowInferer",
                "roi_size": [64, 64, 64],
                "overlap": 0.25,
                "mode": "gaussian",
                "padding_mode": "replicate",
                "device": "@device",
            },
            "postprocessing": {
                "_target_": "Compose",
                "transforms": [
                    {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                    {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                    {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image"},
                ],
            },
            "checkpointloader": {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/' + @modelname",
                "load_dict": {"model": "@network_def"},
            },
        }
        channels = {"0": "background", "1": "liver", "2": "spleen"}
        metadata = {"name": "wholeBody-like (self-test)", "version": "0.0.1"}
        metadata["network_data_format"] = {"outputs": {"pred": {"channel_def": channels}}}
        (folder / "configs" / "inference.json").write_text(json.dumps(config))
        (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
        torch.manual_seed(0)
        arguments = {k: v for k, v in network.items() if k != "_target_"}
        torch.save(SegResNet(**arguments).state_dict(), folder / "models" / "model_lowres.pt")
        return folder

    def test_a_model_set_segments_with_each_of_its_models(self):
        self.delayDisplay("Add model: a model set")
        from MedSegUNetLib.core.errors import MedSegError
        from MedSegUNetLib.model.bundle import read_bundle_metadata

        logic = self.newLogic()
        first, second = self.createdModel(), self.createdModel("vessel", "selftest-vessel")
        modelSet = logic.createModelSet("organs and vessels", [first, second])
        self.assertTrue(logic.isModelSet(modelSet))
        self.assertEqual(modelSet.parent, logic.importedModelsFolder())
        self.assertIn(modelSet, logic.availableModels())
        self.assertEqual(modelLabel(modelSet), "organs and vessels")
        self.assertTrue(logic.describeModel(modelSet).startswith("Set of 2 models, 3 structures"))
        self.assertFalse(logic.prepareStandby(modelSet, "cpu"))  # the waiting engine holds one bundle
        self.assertIsNone(logic.standby)

        volume, array = self.syntheticVolume()
        kind, state, message = logic.segmentAndWait(volume, modelSet)
        self.assertEqual((kind, state), ("segment", SUCCEEDED), f"{message}\n{logic.logText()}")
        node = logic.resultNode
        expected = [label.name for model in (first, second) for label in read_bundle_metadata(model).labels]
        self.assertEqual(logic.segmentNames(node), expected)  # every model's structures, in the set's order
        self.assertEqual(logic.segmentsToReplace(node, modelSet), expected)
        for index in range(len(expected)):
            self.assertOnVolumeGrid(node, node.GetSegmentation().GetNthSegmentID(index), volume)
        self.assertEqual(node.GetAttribute("MedSegUNet.Model"), str(modelSet))

        with self.assertRaises(MedSegError):  # a set of one bundle twice is refused, and nothing is listed
            logic.createModelSet("twice", [first, first])
        overlapping = self.createdModel("vessel,organ", "selftest-overlapping")
        with self.assertRaisesRegex(MedSegError, "'organ'"):  # one structure from two models: refused when made
            logic.createModelSet("overlapping", [first, overlapping])
        self.assertEqual([m for m in logic.availableModels() if logic.isModelSet(m)], [modelSet])

    def smallNnunetModel(self) -> Path:
        """A trained-model folder laid out as nnU-Net v2 writes it (plans, dataset description, one fold's
        checkpoint of the planned network with seeded weights), made with the nnU-Net team's network package."""
        import json
        import shutil

        import torch
        from dynamic_network_architectures.architectures.unet import PlainConvUNet

        folder = (
            Path(slicer.app.temporaryPath)
            / "MedSegUNetTest"
            / "Dataset900_Test"
            / "nnUNetTrainer__nnUNetPlans__3d_fullres"
        )
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "fold_0").mkdir(parents=True)
        layers = {
            "n_stages": 2,
            "features_per_stage": [4, 8],
            "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
            "strides": [[1, 1, 1], [2, 2, 2]],
            "n_conv_per_stage": [1, 1],
            "n_conv_per_stage_decoder": [1],
            "conv_bias": True,
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin_kwargs": {"inplace": True},
        }
        ops = {"conv_op": "torch.nn.modules.conv.Conv3d", "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d"}
        ops["nonlin"] = "torch.nn.LeakyReLU"
        configuration = {
            "spacing": [2.0, 2.0, 2.0],
            "patch_size": [16, 32, 32],
            "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False],
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {**layers, **ops},
                "_kw_requires_import": list(ops),
            },
        }
        plans = {
            "plans_name": "nnUNetPlans",
            "transpose_forward": [0, 1, 2],
            "configurations": {"3d_fullres": configuration},
        }
        dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nrrd"}
        (folder / "plans.json").write_text(json.dumps(plans))
        (folder / "dataset.json").write_text(json.dumps(dataset))
        torch.manual_seed(0)
        network = PlainConvUNet(
            input_channels=1,
            num_classes=2,
            conv_op=torch.nn.Conv3d,
            norm_op=torch.nn.InstanceNorm3d,
            nonlin=torch.nn.LeakyReLU,
            deep_supervision=False,
            **layers,
        )
        checkpoint = {
            "network_weights": network.state_dict(),
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2),
            "current_epoch": 1,
        }
        torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
        return folder

    def test_panel_segments_in_the_background(self):
        self.delayDisplay("Segment through the panel")
        volume, _ = self.syntheticVolume()
        widget = slicer.util.getModuleWidget("MedSegUNet")
        widget.logic.userModelsKey = self.TEST_MODELS_KEY  # the user's model list is not touched
        try:
            widget.logic.rememberModel(self.model())
            widget.refreshModels(select=self.model())
            widget.initializeParameterNode()
            menu = [action.text for action in widget.ui.addModelButton.menu().actions()]
            self.assertEqual(len(menu), 3)  # a bundle, a zipped model, a model folder
            self.segmentThroughThePanel(widget, volume)
        finally:
            widget.logic.stopStandby()  # one may have been started for the test's model after the run
            widget.logic.userModelsKey = USER_MODELS_KEY
            widget.refreshModels()

    def segmentThroughThePanel(self, widget, volume):
        parameters = widget.logic.getParameterNode()
        parameters.inputVolume = volume
        widget.onModelChanged()
        self.assertAlmostEqual(parameters.overlap, widget.logic.modelOverlap(widget.currentModel()))
        self.assertIsNone(widget.chosenOverlap())  # left at the model's own: each model runs with its own
        parameters.overlap = 0.25
        self.assertAlmostEqual(widget.chosenOverlap(), 0.25)
        parameters.show3D = False
        self.assertAlmostEqual(widget.ui.overlapSliderWidget.value, 0.25)  # parameter -> widget
        widget.ui.ttaCheckBox.checked = True
        self.assertTrue(parameters.useTTA)  # widget -> parameter
        widget.ui.ttaCheckBox.checked = False
        combo = widget.ui.deviceComboBox
        self.assertEqual([combo.itemData(0), combo.itemData(combo.count - 1)], ["auto", "cpu"])
        combo.setCurrentIndex(combo.findData("cpu"))
        self.assertTrue(widget.ui.segmentButton.enabled)

        widget.onSegmentButton()
        self.assertEqual(widget.ui.segmentButton.text, "Cancel")
        self.waitWhileBusy(widget.logic)
        self.assertEqual(widget.ui.segmentButton.text, "Segment")
        self.assertTrue(widget.ui.statusLabel.text.startswith("Done"), widget.ui.statusLabel.text)
        self.assertIsNotNone(widget.logic.resultNode)
        self.assertEqual(parameters.outputSegmentation.GetID(), widget.logic.resultNode.GetID())  # now the output
        segmentation = parameters.outputSegmentation.GetSegmentation()
        self.assertFalse(segmentation.ContainsRepresentation("Closed surface"))
        widget.ui.show3DCheckBox.checked = True  # Show 3D on the result the panel shows
        self.assertTrue(parameters.show3D)
        self.assertTrue(segmentation.ContainsRepresentation("Closed surface"))
        widget.ui.show3DCheckBox.checked = False
        self.assertFalse(segmentation.ContainsRepresentation("Closed surface"))
        # Show log has the command line, or the job the engine kept ready was given
        self.assertRegex(widget.logic.logText(), r"MedSegUNetLib segment |job: \{\"segment\"")

    def test_the_engine_kept_ready_segments_as_a_fresh_one(self):
        self.delayDisplay("Segment on the engine started ahead")
        volume, _ = self.syntheticVolume()
        logic = self.newLogic()
        kept = logic.keepEngineReady()
        try:
            logic.setKeepEngineReady(True)
            self.assertTrue(logic.prepareStandby(self.model(), "cpu"))
            waiting = logic.standby
            self.assertTrue(logic.prepareStandby(self.model(), "cpu"))
            self.assertIs(logic.standby, waiting)  # it fits: not started again
            kind, state, message = logic.segmentAndWait(volume, self.model(), "cpu")
            self.assertEqual((kind, state), ("segment", SUCCEEDED), f"{message}\n{logic.logText()}")
            self.assertTrue(logic.lastRunWasReady)
            self.assertIsNone(logic.standby)  # one job per engine
            self.assertIn("standby", logic.logText().splitlines()[0])
            ready = self.segmentArrays(logic, volume)

            logic.setKeepEngineReady(False)
            self.assertFalse(logic.prepareStandby(self.model(), "cpu"))
            self.assertIsNone(logic.standby)
            kind, state, message = logic.segmentAndWait(volume, self.model(), "cpu")
            self.assertEqual(state, SUCCEEDED, message)
            self.assertFalse(logic.lastRunWasReady)
            fresh = self.segmentArrays(logic, volume)
            self.assertEqual(sorted(ready), sorted(fresh))
            for name in fresh:
                self.assertTrue((ready[name] == fresh[name]).all(), f"segment {name} differs between the two engines")

            # Another device: the waiting engine is replaced, and the old one ends.
            logic.setKeepEngineReady(True)
            logic.prepareStandby(self.model(), "cpu")
            first = logic.standby
            logic.prepareStandby(self.model(), "auto")
            self.assertIsNot(logic.standby, first)
            self.assertNotEqual(first.process.wait(timeout=60), RUNNING)
        finally:
            logic.stopStandby()
            logic.setKeepEngineReady(kept)

    def segmentArrays(self, logic, volume) -> dict:
        node = logic.resultNode
        segmentation = node.GetSegmentation()
        arrays = {}
        for index in range(segmentation.GetNumberOfSegments()):
            array = slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentation.GetNthSegmentID(index), volume)
            arrays[segmentation.GetNthSegment(index).GetName()] = array.copy()  # the node is written again next
        return arrays

    def test_cancel_ends_the_run_and_adds_nothing(self):
        self.delayDisplay("Cancel")
        volume, _ = self.syntheticVolume()
        logic = self.newLogic()
        started = time.monotonic()
        # TTA makes the run long enough that the cancel surely arrives before the end
        kind, state, _ = logic.segmentAndWait(volume, self.model(), cancelAfterFirstProgress=True, tta=True)
        self.assertEqual((kind, state), ("segment", CANCELLED), logic.logText())
        self.assertLess(time.monotonic() - started, 60)
        self.assertIsNotNone(logic.run.process.poll())  # the engine is gone
        self.assertIsNone(logic.resultNode)
        self.assertEqual(slicer.util.getNodesByClass("vtkMRMLSegmentationNode"), [])
        self.assertFalse((Path(logic.workFolder.name) / "result.seg.nrrd").exists())
        self.assertIsNone(logic.busy())

    def test_retrain_registers_a_new_model(self):
        self.delayDisplay("Retrain with a small budget")
        import numpy as np

        from MedSegUNetLib.model.bundle import read_bundle_metadata

        volume, array = self.syntheticVolume()
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "annotation")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("organ")
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            (array > 0).astype(np.uint8), segmentationNode, segmentId, volume
        )
        logic = self.newLogic()
        self.assertIn((volume, segmentationNode), logic.annotatedPairs())
        kept = logic.keepEngineReady()
        try:
            logic.setKeepEngineReady(True)
            self.assertTrue(logic.prepareStandby(self.model(), "cpu"))
            waiting = logic.standby
            kind, state, message = logic.trainAndWait([segmentationNode], init=self.model(), maxSteps=2)
            self.assertIsNone(logic.standby)  # training took its memory back
            self.assertNotEqual(waiting.process.state, RUNNING)
        finally:
            logic.stopStandby()
            logic.setKeepEngineReady(kept)
        self.assertEqual((kind, state), ("train", SUCCEEDED), f"{message}\n{logic.logText()}")
        bundle = Path(message)
        self.assertTrue(bundle.is_file())
        self.assertIn(bundle, logic.availableModels())
        self.assertNotIn(str(bundle), qt.QSettings().value(USER_MODELS_KEY) or [])  # the user's list is untouched
        self.assertIn("organ", [label.name for label in read_bundle_metadata(bundle).labels])
