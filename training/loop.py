"""The training run: steps, validation with the engine's own prediction, checkpoints, the bundle."""

from __future__ import annotations

import csv
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from MedSegUNetLib.core.errors import Cancelled
from MedSegUNetLib.core.geometry import xyz_to_zyx
from MedSegUNetLib.core.labels import Label
from MedSegUNetLib.core.progress import Progress
from MedSegUNetLib.model.bundle import BundleMeta, create_bundle, default_provenance, load_bundle, save_bundle
from MedSegUNetLib.model.network import build_network
from MedSegUNetLib.prediction.inference import PredictOptions, predict_labels, select_device

from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from .config import Plan, TrainConfig
from .contrast_agent import ContrastPhases, enhancement_in_network_units
from .data import ALL_AXES, PreparedCase, mirror_axes
from .distributed import World
from .field_of_view import SlabCrops, slab_axis
from .losses import IGNORE, make_loss
from .stream import Batch, batch_stream, default_workers

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


@dataclass
class RunState:
    step: int = 0
    best_dice: float = -1.0
    seconds: float = 0.0


def training_network(meta: BundleMeta) -> torch.nn.Module:
    """The bundle's network, with DynUNet's deep supervision off (one output, like inference)."""
    return build_network(meta.network)


def grow_output(network: torch.nn.Module, old_bundle_network: torch.nn.Module, old_classes: int) -> None:
    """Copy every weight of the old model; in the output layer, only the rows of its old classes."""
    new_state = network.state_dict()
    for name, tensor in old_bundle_network.state_dict().items():
        if name not in new_state:
            continue
        if new_state[name].shape == tensor.shape:
            new_state[name].copy_(tensor)
        elif new_state[name].shape[1:] == tensor.shape[1:] and tensor.shape[0] == old_classes:
            new_state[name][:old_classes].copy_(tensor)


def validate(
    network: torch.nn.Module, cases: List[PreparedCase], labels: List[Label], patch_zyx: Sequence[int], device: str
) -> Dict[str, Optional[float]]:
    """Dice and HD95 (mm) per label with the same sliding-window prediction as `segment`."""
    from monai.metrics import compute_dice, compute_hausdorff_distance
    from monai.networks.utils import one_hot

    classes = len(labels) + 1
    dice_values: List[List[float]] = [[] for _ in labels]
    hd_values: List[List[float]] = [[] for _ in labels]
    for case in cases:
        predicted = predict_labels(
            network, case.image, patch_zyx, PredictOptions(overlap=0.25, device=device), Progress()
        )
        unreviewed = case.label[0] == IGNORE
        predicted[unreviewed] = 0  # voxels nobody reviewed count for nothing
        prediction = one_hot(torch.as_tensor(predicted[None, None]).long(), classes)
        reference = one_hot(torch.as_tensor(np.where(unreviewed, 0, case.label[0])[None, None]).long(), classes)
        dice = compute_dice(prediction, reference, include_background=False, ignore_empty=False)[0].numpy()
        with warnings.catch_warnings():  # MONAI warns about its own deprecated call, and about empty classes
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"the (ground truth|prediction) of class \d+ is all 0")
            hd = compute_hausdorff_distance(prediction, reference, percentile=95, spacing=list(case.spacing_zyx))[0]
        for index in [c - 1 for c in case.annotated] if case.annotated else range(len(labels)):
            dice_values[index].append(float(np.nan_to_num(dice[index], nan=0.0)))  # only where it is annotated
            if np.isfinite(hd[index].item()):
                hd_values[index].append(float(hd[index]))
    metrics: Dict[str, Optional[float]] = {}
    for index, label in enumerate(labels):
        metrics[f"dice_{label.name}"] = round(float(np.mean(dice_values[index])), 4) if dice_values[index] else None
        metrics[f"hd95_mm_{label.name}"] = round(float(np.mean(hd_values[index])), 2) if hd_values[index] else None
    measured = [float(np.mean(values)) for values in dice_values if values]
    metrics["dice_mean"] = round(float(np.mean(measured)), 4) if measured else 0.0
    network.train()
    return metrics


def amp_dtype(device: torch.device, wanted: Optional[bool]) -> Optional[torch.dtype]:
    """Mixed precision on CUDA (bf16 where the GPU has it, else fp16); never on CPU or MPS."""
    if device.type != "cuda" or wanted is False:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_optimizer(
    config: TrainConfig, network: torch.nn.Module, steps: int
) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(network.parameters(), lr=config.lr, momentum=0.99, nesterov=True, weight_decay=3e-5)
    else:
        optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=1e-4)
    if config.schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    else:
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: (1 - min(step, steps) / max(steps, 1)) ** 0.9
        )
    return optimizer, schedule


class Run:
    """The state that lives through one training run; each method does one part of it."""

    def __init__(
        self,
        config: TrainConfig,
        plan: Plan,
        labels: List[Label],
        train: List[PreparedCase],
        val: List[PreparedCase],
        summary: Dict[str, Any],
        progress: Progress,
        world: Optional[World] = None,
    ):
        from monai.utils import set_determinism

        self.config, self.plan, self.labels, self.val_cases = config, plan, labels, val
        self.world = world or World()
        self.train_cases = self.world.shard(train)
        self.summary, self.progress = summary, progress
        self.folder = Path(config.output)
        self.device = self.world.device(select_device(config.device))
        set_determinism(seed=config.seed)  # python, numpy and torch seeds; deterministic cuDNN
        self.amp = amp_dtype(self.device, config.amp)
        self.board: Optional[SummaryWriter] = None
        self.patch_zyx = xyz_to_zyx(plan.preprocessing.patch_size)
        self.start_network: Optional[torch.nn.Module] = None  # the --init model, as it was
        self.start_classes = 0
        self.meta = self._initial_meta()
        self.network = self.meta_network
        self.optimizer, self.schedule = make_optimizer(config, self.network, plan.steps)
        self.state = RunState()
        self.log_rows: List[dict] = []

    def _initial_meta(self) -> BundleMeta:
        torch.manual_seed(self.config.seed)
        if self.config.init:
            old = load_bundle(self.config.init)
            bundle = create_bundle(self.labels, old.meta.preprocessing, old.meta.channels, seed=self.config.seed)
            spec = old.meta.network
            spec.args["out_channels"] = len(self.labels) + 1
            bundle.meta.network = spec
            self.meta_network: torch.nn.Module = build_network(spec)
            grow_output(self.meta_network, old.network, len(old.meta.labels) + 1)
            self.start_network, self.start_classes = old.network, len(old.meta.labels) + 1
        else:
            bundle = create_bundle(
                self.labels,
                self.plan.preprocessing,
                ["CT" if self.config.modality == "ct" else "MR"],
                seed=self.config.seed,
                base_filters=self.config.filters,
            )
            self.meta_network = bundle.network
        axes = mirror_axes([label.name for label in self.labels], bundle.meta.preprocessing)
        bundle.meta.mirror_axes = None if axes == ALL_AXES else axes  # None: every axis, as before
        return bundle.meta

    def resume(self) -> None:
        if (self.folder / CHECKPOINT).exists():
            saved = load_checkpoint(self.folder, self.network, self.optimizer)
            self.state = RunState(**saved["run"])
            self.log_rows = saved.get("log", [])
            for _ in range(self.state.step):
                self.schedule.step()
            self.progress.note(f"resumed at step {self.state.step}")

    def checkpoint(self) -> None:
        if not self.world.is_main:
            return
        save_checkpoint(self.folder, self.network, self.optimizer, {"run": asdict(self.state), "log": self.log_rows})

    def write_bundle(self, name: str, metrics: Dict[str, Optional[float]]) -> Path:
        self.meta.name = self.folder.resolve().name
        self.meta.provenance = default_provenance(
            training={
                **self.summary,
                "steps": self.state.step,
                "seconds": round(self.state.seconds, 1),
                "device": self.device.type,
            },
            metrics=metrics,
        )
        return save_bundle(self.folder / name, self.meta, self.network)

    def run(self) -> Path:
        loss_function = make_loss(self.config)
        teacher = self._teacher()
        self.network.to(self.device).train()
        model = self.world.wrap(self.network, self.device)
        # fp16 needs loss scaling against underflow; bf16 and fp32 do not
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        seed = self.world.seed(self.config.seed + self.state.step)
        stream = self._batch_stream(seed)
        started, deadline = time.monotonic() - self.state.seconds, self._deadline()
        metrics: Dict[str, Optional[float]] = {}
        try:
            while not self.world.agree_to_stop(self.state.step >= self.plan.steps or time.monotonic() >= deadline):
                batch = next(stream)
                self.world.record(batch["case"], batch["image"])
                self.optimizer.zero_grad(set_to_none=True)
                with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                    images = batch["image"].to(self.device, non_blocking=True)
                    labels = batch["label"].to(self.device, non_blocking=True)
                    with torch.no_grad():
                        kept = teacher(images) if teacher is not None else None
                    loss = loss_function(model(images), labels, batch["annotated"].to(self.device), kept)
                scaler.scale(loss).backward()
                scaler.step(self.optimizer)
                scaler.update()
                self.schedule.step()
                self.state.step += 1
                self.state.seconds = time.monotonic() - started
                row = {
                    "step": self.state.step,
                    "loss": round(loss.item(), 5),
                    "lr": self.optimizer.param_groups[0]["lr"],
                }
                if self.state.step % self.config.validate_every == 0 or self.state.step == self.plan.steps:
                    metrics = self._validate_and_keep_best(row)
                self.log_rows.append(row)
                self._report(row)
            if not metrics or self.log_rows[-1].get("dice_mean") is None:
                metrics = self._validate_and_keep_best(self.log_rows[-1] if self.log_rows else {"step": 0})
            self.checkpoint()
        except (Cancelled, KeyboardInterrupt):
            self.checkpoint()
            raise
        finally:
            self.world.write_record(self.folder)
            if self.board is not None:
                self.board.close()
        if not self.world.is_main:
            return self.folder / "model.safetensors"
        last = self.write_bundle("last.safetensors", metrics)
        if not (self.folder / "model.safetensors").exists():
            self.write_bundle("model.safetensors", metrics)
        self._write_logs()
        return self.folder / "model.safetensors" if (self.folder / "model.safetensors").exists() else last

    def _teacher(self) -> Optional[torch.nn.Module]:
        """The starting model, frozen, when some training case leaves out a structure it segments: its
        output there is what fine-tuning keeps (see losses.py)."""
        if self.start_network is None:
            return None
        known = set(range(1, self.start_classes))
        if all(not case.annotated or known <= set(case.annotated) for case in self.train_cases):
            return None
        teacher = self.start_network.to(self.device).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        return teacher

    def _batch_stream(self, seed: int) -> Iterator[Batch]:
        workers = self.config.workers if self.config.workers is not None else default_workers(self.device)
        classes = len(self.labels) + 1
        return batch_stream(
            self.train_cases,
            self.patch_zyx,
            classes,
            self.plan.batch_size,
            seed,
            workers,
            pin_memory=self.device.type == "cuda",
            foreground_fraction=self.config.foreground_fraction,
            flip_axes=self.meta.mirror_axes if self.meta.mirror_axes is not None else ALL_AXES,
            slabs=SlabCrops(slab_axis(self.meta.preprocessing), self.config.slab_crops)
            if self.config.slab_crops
            else None,
            phases=self._contrast_phases(),
        )

    def _contrast_phases(self) -> Optional[ContrastPhases]:
        largest = enhancement_in_network_units(
            [label.name for label in self.labels], self.meta.preprocessing.normalization
        )
        return ContrastPhases(largest, self.config.contrast_phases) if largest and self.config.contrast_phases else None

    def _deadline(self) -> float:
        return time.monotonic() + self.config.max_minutes * 60 if self.config.max_minutes else float("inf")

    def _validate_and_keep_best(self, row: dict) -> Dict[str, Optional[float]]:
        if not self.world.is_main:
            return {"dice_mean": None}  # rank 0 validates; the others wait for it in the next all-reduce
        self.progress.update("validate", 0, len(self.val_cases), "validating")
        metrics = validate(self.network, self.val_cases, self.labels, self.patch_zyx, self.device.type)
        dice_mean = metrics["dice_mean"]  # validate() always measures it; only per-label HD95 may be None
        row["dice_mean"] = dice_mean
        self.progress.update(
            "validate",
            len(self.val_cases),
            len(self.val_cases),
            f"Dice {dice_mean:.3f}",
            dice=dice_mean,
        )
        self._board_scalars({f"validation/{k}": v for k, v in metrics.items() if v is not None}, row["step"])
        if dice_mean is not None and dice_mean > self.state.best_dice:
            self.state.best_dice = dice_mean
            self.write_bundle("model.safetensors", metrics)
        self.checkpoint()
        return metrics

    def _board_scalars(self, values: Dict[str, float], step: int) -> None:
        """TensorBoard event files in OUTDIR/tensorboard (rank 0 only)."""
        if not self.world.is_main:
            return
        if self.board is None:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(self.folder / "tensorboard"))
        for name, value in values.items():
            self.board.add_scalar(name, value, step)

    def _report(self, row: dict) -> None:
        self._board_scalars({"train/loss": row["loss"], "train/lr": row["lr"]}, row["step"])
        done, total = self.state.step, self.plan.steps
        eta = self.state.seconds / done * (total - done) if done else None
        self.progress.update(
            "train",
            done,
            total,
            f"step {done}/{total} loss {row['loss']:.4f}",
            loss=row["loss"],
            eta_s=round(eta, 1) if eta else None,
            step=done,
        )

    def _write_logs(self) -> None:
        columns = ["step", "loss", "lr", "dice_mean"]
        with open(self.folder / "log.csv", "w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.log_rows)
        plot_learning_curve(self.log_rows, self.folder / "learning_curve.png")


def plot_learning_curve(rows: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=100)
    loss_axis.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue", label="training loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("Dice + CE loss", color="tab:blue")
    dice_rows = [r for r in rows if r.get("dice_mean") is not None]
    if dice_rows:
        dice_axis = loss_axis.twinx()
        dice_axis.plot(
            [r["step"] for r in dice_rows],
            [r["dice_mean"] for r in dice_rows],
            "o-",
            color="tab:red",
            label="validation Dice",
        )
        dice_axis.set_ylabel("mean validation Dice", color="tab:red")
        dice_axis.set_ylim(0, 1)
    loss_axis.set_title("MedSegUNet training")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
