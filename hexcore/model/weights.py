"""Read exactly the tensors (and slices of tensors) a rank needs from a safetensors checkpoint,
never the whole model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class Checkpoint:
    """A directory of *.safetensors files, indexed by tensor name."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.device = device
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: model_dir / file for name, file in weight_map.items()}
        else:
            self._file_of = {}
            for file in sorted(model_dir.glob("*.safetensors")):
                with safe_open(file, framework="pt") as handle:
                    self._file_of.update({name: file for name in handle.keys()})
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _slice(self, name: str):
        if name not in self._file_of:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        file = self._file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file].get_slice(name)

    def _finish(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype).contiguous()

    def full(self, name: str) -> torch.Tensor:
        return self._finish(self._slice(name)[:])

    def rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of a 2-D tensor (a column-parallel or vocab shard)."""
        return self._finish(self._slice(name)[start:end])

    def cols(self, name: str, start: int, end: int) -> torch.Tensor:
        """Columns [start, end) of a 2-D tensor (a row-parallel shard)."""
        return self._finish(self._slice(name)[:, start:end])

    def close(self) -> None:
        self._handles.clear()
