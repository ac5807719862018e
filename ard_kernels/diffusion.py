"""The teacher's sampler: DDIM (eta 0) on DiT's linear β schedule, respaced, with classifier-free guidance.

``x_{t'} = √ᾱ_{t'}·x̂₀ + √(1 − ᾱ_{t'})·ε̂``, ``x̂₀ = (x_t − √(1 − ᾱ_t)·ε̂) / √ᾱ_t``: one deterministic
DDIM step from respaced timestep ``t`` to the previous kept timestep ``t'`` (``ᾱ = 1`` after the
last one, so the final step returns ``x̂₀``).

The schedule is DiT's: 1000 training timesteps, β linear from 1e-4 to 0.02 (float64), ``ᾱ_t =
Π_{s≤t}(1 − β_s)``. Sampling keeps S of the 1000 timesteps (:func:`respaced_timesteps`) and calls
the model with the *original* timestep values, as DiT's respacing wrapper does.

Step indices follow DiT's sampling loop: ``i`` runs ``S−1, S−2, …, 0``; step ``i`` starts at
timestep ``timesteps[i]``. "Recording index i" stores what step ``i`` produced: the x0-prediction
``x̂₀`` (``record="x0"``, what the ARD reference trains on) or the next state ``x_{t'}``
(``record="xt"``). Index 0 gives the final sample in both cases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

RECORD_KINDS = ("x0", "xt")
SPACINGS = ("ddim", "uniform")
DEFAULT_RECORD_INDICES = (15, 10, 5, 0)


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """``β_t = β_start + (β_end − β_start)·t/(T − 1)``, scaled by ``1000/T`` as DiT does: (T,) float64."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps: expected at least 2, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """``ᾱ_t = Π_{s≤t}(1 − β_s)``: (T,) float64."""
    return torch.cumprod(1.0 - betas.double(), dim=0)


def respaced_timesteps(num_timesteps: int, steps: int, spacing: str = "ddim") -> torch.Tensor:
    """The S kept timesteps of a T-step schedule, ascending: (S,) int64.

    ``spacing="ddim"`` (DiT's ``"ddimS"``): ``0, k, 2k, …`` with the integer stride ``k`` that gives
    exactly S timesteps (S = 25 of 1000: 0, 40, …, 960). ``spacing="uniform"`` (DiT's ``"S"``):
    ``round(i·(T − 1)/(S − 1))``, both ends included (S = 25 of 1000: 0, 42, …, 999).
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps: expected 1 <= steps <= {num_timesteps}, got {steps}")
    if spacing == "ddim":
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == steps:
                return torch.arange(0, num_timesteps, stride, dtype=torch.int64)
        raise ValueError(f"steps: no integer stride gives exactly {steps} of {num_timesteps} timesteps; "
                         f"use spacing='uniform'")
    if spacing == "uniform":
        if steps == 1:
            return torch.zeros(1, dtype=torch.int64)
        frac = (num_timesteps - 1) / (steps - 1)
        # Python's round (half to even) on exact multiples, as float64 arithmetic gives them.
        return torch.tensor([round(i * frac) for i in range(steps)], dtype=torch.int64)
    raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")


def guided_eps(model: Callable, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
               num_classes: int | None = None, guidance_channels: int | None = None) -> torch.Tensor:
    """``ε̂ = ε(x, t, ∅) + s·(ε(x, t, y) − ε(x, t, ∅))`` — the first C output channels, C = x.shape[1].

    With ``cfg_scale == 1`` one plain call ``model(x, t, y)``. Otherwise DiT's convention: the batch
    is doubled, the second half labelled with the null class ``num_classes`` (default
    ``model.num_classes``), and ``model.forward_with_cfg(x2, t2, y2, cfg_scale)`` returns the guided
    output for both halves; the first half is kept. ``guidance_channels`` is passed on when given
    (DiT's own default guides only 3 of the 4 ε channels; None keeps the model's default). A model
    without ``forward_with_cfg`` is guided here on the first ``guidance_channels`` (default all C).

    Args:
        x: (B, C, H, W); t: (B,) timesteps; y: (B,) int64 labels.

    Returns:
        (B, C, H, W) in the model's output dtype.
    """
    c = x.shape[1]
    if cfg_scale == 1.0:
        return model(x, t, y)[:, :c]
    if num_classes is None:
        num_classes = getattr(model, "num_classes", None)
        if num_classes is None:
            raise ValueError("num_classes: needed for classifier-free guidance (the null class id); "
                             "the model has no num_classes attribute")
    b = x.shape[0]
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])
    y2 = torch.cat([y, torch.full_like(y, num_classes)])
    if hasattr(model, "forward_with_cfg"):
        kw = {} if guidance_channels is None else {"guidance_channels": guidance_channels}
        return model.forward_with_cfg(x2, t2, y2, cfg_scale, **kw)[:b, :c]
    out = model(x2, t2, y2)[:, :c]
    cond, uncond = out[:b], out[b:]
    g = c if guidance_channels is None else guidance_channels
    return torch.cat([uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g]), cond[:, g:]], dim=1)


class DDIMSampler:
    """Deterministic DDIM (eta 0) over S respaced timesteps of DiT's linear schedule.

    Args:
        steps: S, the number of sampling steps (default 25).
        spacing: "ddim" (default) or "uniform", see :func:`respaced_timesteps`.
        num_train_timesteps, beta_start, beta_end: the training schedule (DiT: 1000, 1e-4, 0.02).
    """

    def __init__(self, steps: int = 25, spacing: str = "ddim", num_train_timesteps: int = 1000,
                 beta_start: float = 1e-4, beta_end: float = 0.02):
        self.steps = steps
        self.spacing = spacing
        self.num_train_timesteps = num_train_timesteps
        acp = alphas_cumprod(linear_betas(num_train_timesteps, beta_start, beta_end))
        self.timesteps = respaced_timesteps(num_train_timesteps, steps, spacing)
        self.alphas_cumprod = acp[self.timesteps]
        # ᾱ of the state each step produces: the previous kept timestep, 1.0 after the last step.
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    def check_indices(self, indices: Sequence[int]) -> list[int]:
        """Validate recording indices: ints in [0, S), strictly decreasing (the order steps run in)."""
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("record_indices: expected at least one step index")
        bad = [i for i in idx if not 0 <= i < self.steps]
        if bad:
            raise ValueError(f"record_indices: expected step indices in [0, {self.steps}), got {bad}")
        if any(a <= b for a, b in zip(idx, idx[1:])):
            raise ValueError(f"record_indices: expected strictly decreasing indices (steps run S-1 ... 0), got {idx}")
        return idx

    def step(self, x: torch.Tensor, eps: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from index ``i``: returns (x_prev, x0_pred), both fp32 (B, C, H, W)."""
        a = float(self.alphas_cumprod[i])
        a_prev = float(self.alphas_cumprod_prev[i])
        x, eps = x.float(), eps.float()
        x0 = (x - (1.0 - a) ** 0.5 * eps) / a ** 0.5
        # DiT re-derives ε from x̂₀ before the update; algebraically the same ε, so it is reused here.
        x_prev = a_prev ** 0.5 * x0 + (1.0 - a_prev) ** 0.5 * eps
        return x_prev, x0

    @torch.no_grad()
    def sample(self, model: Callable, noise: torch.Tensor, y: torch.Tensor, cfg_scale: float = 1.5,
               record_indices: Sequence[int] = DEFAULT_RECORD_INDICES, record: str = "x0",
               num_classes: int | None = None, guidance_channels: int | None = None,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Run all S steps from ``x_T = noise`` and record states at ``record_indices``.

        Args:
            model: ``model(x, t, y)`` -> (B, C' ≥ C, H, W) whose first C channels are ε (DiT with
                learn_sigma: C' = 2C); with guidance also ``forward_with_cfg`` (see :func:`guided_eps`).
            noise: x_T (B, C, H, W), float.
            y: (B,) int64 class labels.
            cfg_scale: guidance scale s (DiT's convention; 1 = no guidance).
            record_indices: step indices to record, strictly decreasing (default 15, 10, 5, 0).
            record: "x0" (x0-predictions) or "xt" (the state each step produced).
            num_classes, guidance_channels: see :func:`guided_eps`.
            progress: show a tqdm bar over the steps.

        Returns:
            (final sample (B, C, H, W) fp32, recorded (B, K, C, H, W) fp32), K = len(record_indices).
        """
        if record not in RECORD_KINDS:
            raise ValueError(f"record: expected one of {RECORD_KINDS}, got {record!r}")
        if noise.dim() != 4:
            raise ValueError(f"noise: expected (B, C, H, W), got shape {tuple(noise.shape)}")
        if y.shape != noise.shape[:1]:
            raise ValueError(f"y: expected shape ({noise.shape[0]},), got {tuple(y.shape)}")
        idx = self.check_indices(record_indices)
        slot = {i: k for k, i in enumerate(idx)}
        b = noise.shape[0]
        recorded = noise.new_empty((b, len(idx), *noise.shape[1:]), dtype=torch.float32)
        x = noise.float()
        loop = range(self.steps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            loop = tqdm(loop, desc="ddim", leave=False)
        for i in loop:
            t = torch.full((b,), int(self.timesteps[i]), dtype=torch.int64, device=noise.device)
            eps = guided_eps(model, x.to(noise.dtype), t, y, cfg_scale, num_classes, guidance_channels)
            x, x0 = self.step(x, eps, i)
            if i in slot:
                recorded[:, slot[i]] = x0 if record == "x0" else x
        return x, recorded
