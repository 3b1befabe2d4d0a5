"""Resumable checkpoints without pickle: weights and optimizer tensors in safetensors, the rest in JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Sequence

import torch

from MedSegUNetLib.core.atomic import atomic_path
from MedSegUNetLib.core.errors import MedSegError

CHECKPOINT = "checkpoint.safetensors"


def save_checkpoint(
    folder: Path, network: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]
) -> Path:
    """Atomic: a run killed while writing leaves the previous checkpoint intact."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    scalars = {"param_groups": optimizer_state["param_groups"], "state": {}}
    for index, values in optimizer_state["state"].items():
        scalars["state"][str(index)] = {}
        for key, value in values.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars["state"][str(index)][key] = float(value)
    tensors["rng.torch"] = torch.get_rng_state()
    # DynUNet registers blocks twice; store each storage once.
    unique, seen = {}, set()
    for name, tensor in tensors.items():
        key = (tensor.data_ptr(), tensor.numel())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        unique[name] = tensor.clone()
    path = Path(folder) / CHECKPOINT
    try:
        with atomic_path(path) as temporary:
            save_file(unique, str(temporary), metadata={"state": json.dumps(state), "optimizer": json.dumps(scalars)})
    except Exception as error:  # safetensors raises its own error type for I/O failures (disk full, folder gone)
        raise MedSegError(f"could not write the checkpoint ({error}); the previous one is unchanged", path) from None
    return path


def load_checkpoint(folder: Path, network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    from safetensors import safe_open

    path = Path(folder) / CHECKPOINT
    if not path.exists():
        raise MedSegError("no checkpoint to resume from", path)
    try:
        with safe_open(str(path), "pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            metadata = handle.metadata()
    except Exception as error:
        raise MedSegError(f"checkpoint is unreadable ({error})", path) from None
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    network.load_state_dict(model_state, strict=False)  # aliases of stored weights are the same storage
    missing = [k for k in network.state_dict() if k not in model_state]
    _fill_aliases(network, model_state, missing)
    scalars = json.loads(metadata["optimizer"])
    optimizer_state = {"param_groups": scalars["param_groups"], "state": {}}
    for index, values in scalars["state"].items():
        entry = {key: torch.tensor(value) for key, value in values.items()}
        for name, tensor in tensors.items():
            if name.startswith(f"optim.{index}."):
                entry[name.split(".", 2)[2]] = tensor
        optimizer_state["state"][int(index)] = entry
    optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(tensors["rng.torch"])
    return json.loads(metadata["state"])


def _fill_aliases(network: torch.nn.Module, stored: Dict[str, torch.Tensor], missing: Sequence[str]) -> None:
    """Names not stored are aliases of stored ones (same storage): check that they are now equal."""
    state = network.state_dict()
    for name in missing:
        if not any(torch.equal(state[name], tensor) for tensor in stored.values() if tensor.shape == state[name].shape):
            raise MedSegError(f"checkpoint lacks weight '{name}'")
