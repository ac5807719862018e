"""Dataset over trajectory shards (:mod:`ard_kernels.trajectories`): map-style, DistributedSampler-ready.

Item ``i`` (global sample order: shard by shard) is ``{"x_T": (C, H, W), "targets": (K, C, H, W),
"label": int64 ()}`` in fp32; the default collate stacks them. :func:`teacher_forced_states` turns a
batch into the student's input ``[x_T, target_1, …, target_{K−1}]``.

Samples are read one at a time with ``safe_open(...).get_slice`` (no shard is loaded whole unless
``in_memory=True``), so a dataset of any size works with random access; file handles are opened
lazily per process, so DataLoader workers (fork or spawn) each get their own.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset

from ..trajectories import load_manifest


class TrajectoryDataset(Dataset):
    """The shards listed in ``data_dir/manifest.json``.

    Args:
        data_dir: directory written by ``python -m ard_kernels.trajectories``.
        in_memory: load every shard up front (small datasets, tests); otherwise read per item.

    Attributes:
        manifest: the generating config (model, steps, cfg_scale, record, record_indices, K, ...).
        K, in_channels, input_size, num_classes: shape facts the student must match.
    """

    def __init__(self, data_dir, in_memory: bool = False):
        self.root = Path(data_dir)
        self.manifest = load_manifest(self.root)
        self.files = [self.root / s["file"] for s in self.manifest["shards"]]
        counts = [int(s["num"]) for s in self.manifest["shards"]]
        self.offsets = [0]
        for n in counts:
            self.offsets.append(self.offsets[-1] + n)
        self.K = int(self.manifest["K"])
        self.in_channels = int(self.manifest["in_channels"])
        self.input_size = int(self.manifest["input_size"])
        self.num_classes = int(self.manifest["num_classes"])
        self._handles: dict = {}
        self._tensors = [load_file(str(f)) for f in self.files] if in_memory else None

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, row in that shard) of global sample ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index: expected -{len(self)} <= index < {len(self)}, got {index}")
        index %= len(self)
        s = bisect.bisect_right(self.offsets, index) - 1
        return s, index - self.offsets[s]

    def _handle(self, s: int):
        h = self._handles.get(s)
        if h is None:
            h = self._handles[s] = safe_open(str(self.files[s]), framework="pt")
        return h

    def __getitem__(self, index: int) -> dict:
        s, r = self.locate(int(index))
        if self._tensors is not None:
            t = self._tensors[s]
            x_t, targets, label = t["x_T"][r], t["targets"][r], t["labels"][r]
        else:
            h = self._handle(s)
            x_t = h.get_slice("x_T")[r:r + 1][0]
            targets = h.get_slice("targets")[r:r + 1][0]
            label = h.get_slice("labels")[r:r + 1][0]
        return {"x_T": x_t.float(), "targets": targets.float(), "label": label.long()}

    def __getstate__(self):  # open handles do not pickle (spawned workers): reopen lazily
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def teacher_forced_states(x_t: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``states = [x_T, targets_1, …, targets_{K−1}]``: (B, C, H, W), (B, K, C, H, W) → (B, K, C, H, W).

    Head k of the student reads state k and predicts target k (the next state; the last head x_0).
    """
    if targets.dim() != 5 or x_t.shape != targets.shape[:1] + targets.shape[2:]:
        raise ValueError(f"x_T, targets: expected (B, C, H, W) and (B, K, C, H, W), got {tuple(x_t.shape)} "
                         f"and {tuple(targets.shape)}")
    return torch.cat([x_t.unsqueeze(1), targets[:, :-1]], dim=1)
