"""Exponential moving average of the student's weights: ``θ_ema ← decay·θ_ema + (1 − decay)·θ``.

Plain and DDP students use :class:`torch.optim.swa_utils.AveragedModel` with
:func:`~torch.optim.swa_utils.get_ema_multi_avg_fn` (a full copy of the student). An FSDP student
cannot be deep-copied (its parameters are DTensors bound to a process group), and a full copy
would defeat the sharding, so :class:`ShardedEMA` keeps each rank's shard only and gathers the
full tensors when a checkpoint is written. Both expose ``update(model)``, ``state_dict()`` (full
tensors keyed like the student's own state dict) and ``load_state_dict(sd)``.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str, prefix: str = "") -> str:
    """A parameter name without a wrapper's ``prefix`` and activation-checkpoint / compile infixes."""
    if prefix and name.startswith(prefix):
        name = name[len(prefix):]
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


class ModelEMA:
    """EMA of an unsharded student through ``AveragedModel`` (the first update copies the weights)."""

    def __init__(self, student: torch.nn.Module, decay: float):
        self.decay = decay
        self.averaged = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged copy of the student (what sampling and checkpoints use)."""
        return self.averaged.module

    @property
    def num_updates(self) -> int:
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        """``θ_ema ← decay·θ_ema + (1 − decay)·θ`` (a plain copy at the first update); buffers copied.

        What ``AveragedModel.update_parameters`` with ``get_ema_multi_avg_fn`` computes, without its host
        synchronisation: it copies its CPU update counter to the device at every call, a blocking copy
        that waits for the training step's queued GPU work, so the host could never prepare the next batch
        while the GPU computes. Here the counter stays on the host and the update is launched (one
        ``_foreach_lerp_``), never waited for.
        """
        ema = [p.detach() for p in self.module.parameters()]
        current = [p.detach() for p in student.parameters()]
        if len(ema) != len(current):
            raise ValueError(f"student: expected {len(ema)} parameters like the averaged copy, got {len(current)}")
        if int(self.averaged.n_averaged) == 0:  # a CPU tensor: no device read
            torch._foreach_copy_(ema, current)
        else:
            torch._foreach_lerp_(ema, current, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), student.buffers(), strict=True):
            b_ema.copy_(b.detach())
        self.averaged.n_averaged.add_(1)

    def state_dict(self) -> dict:
        """The averaged weights as CPU tensors, keyed like the student's state dict."""
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, sd: dict, num_updates: int) -> None:
        self.module.load_state_dict(sd)
        self.averaged.n_averaged.fill_(num_updates)


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor parameter; a plain tensor itself."""
    return p.to_local() if hasattr(p, "to_local") else p


class ShardedEMA:
    """EMA of an FSDP (``fully_shard``) student, one local shard per parameter on each rank.

    Args:
        model: the sharded module (the one ``fully_shard`` was applied to).
        decay: EMA decay.
        prefix: name prefix to drop from the model's parameter names (a training wrapper's).
    """

    def __init__(self, model: torch.nn.Module, decay: float, prefix: str = ""):
        self.decay = decay
        self.prefix = prefix
        self.names = [clean_name(n, prefix) for n, _ in model.named_parameters()]
        self.shadow = [_local(p).detach().clone() for p in model.parameters()]
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """``shadow ← decay·shadow + (1 − decay)·θ`` on the local shards (a plain copy at the first update)."""
        params = [_local(p).detach() for p in model.parameters()]
        if self.num_updates == 0:
            torch._foreach_copy_(self.shadow, params)
        else:
            torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)
        self.num_updates += 1

    def state_dict(self, model: torch.nn.Module) -> dict:
        """Full CPU tensors keyed by parameter name; a collective: every rank must call it."""
        from torch.distributed.tensor import DTensor

        out = {}
        for name, shard, p in zip(self.names, self.shadow, model.parameters()):
            if isinstance(p, DTensor):
                full = DTensor.from_local(shard, p.device_mesh, p.placements, shape=p.shape,
                                          stride=p.stride()).full_tensor()
            else:
                full = shard
            out[name] = full.detach().cpu()
        return out

    @torch.no_grad()
    def load_state_dict(self, model: torch.nn.Module, sd: dict, num_updates: int) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        for name, shard, p in zip(self.names, self.shadow, model.parameters()):
            full = sd[name].to(device=shard.device, dtype=shard.dtype)
            if isinstance(p, DTensor):
                full = distribute_tensor(full, p.device_mesh, p.placements).to_local()
            shard.copy_(full)
        self.num_updates = num_updates
