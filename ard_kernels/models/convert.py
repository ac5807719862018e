"""Checkpoint plumbing: load DiT/ARD state dicts, infer their sizes, convert from diffusers.

- :func:`read_state_dict` reads ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or
  ``.safetensors`` files and unwraps training checkpoints ({"ema": …} first, then {"model": …}).
- :func:`infer_dit_kwargs` recovers the :class:`~ard_kernels.models.DiT` constructor arguments
  from tensor shapes (the head count from the standard size of that width).
- :func:`diffusers_to_dit` maps diffusers' ``DiTTransformer2DModel`` weights onto DiT's names:
  fused ``qkv`` from ``to_q/to_k/to_v``; the embedders that diffusers repeats in every block
  from block 0; ``proj_out_1``/``proj_out_2`` to the final layer.

Two numerical differences of diffusers' port are not weights, so no conversion removes them:
its timestep sinusoid uses frequencies ``exp(−ln(10⁴)·i/(half − 1))`` (``downscale_freq_shift=1``)
where DiT uses ``i/half``, and its ``norm2`` uses ``norm_eps`` (default 1e-5) where DiT uses 1e-6.
A converted model computes the original DiT's function, which is what published DiT weights
(converted to diffusers from the original) were trained for.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Union

import torch

from .configs import CONFIGS, DiTConfig, heads_for_width

StateDict = Mapping[str, torch.Tensor]


def read_state_dict(state_dict_or_path: Union[StateDict, str, os.PathLike]) -> dict:
    """A state dict from a mapping or a file; training checkpoints are unwrapped (EMA weights first)."""
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        path = os.fspath(state_dict_or_path)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    elif isinstance(state_dict_or_path, Mapping):
        sd = state_dict_or_path
    else:
        raise TypeError(
            f"state_dict_or_path: expected a mapping of tensors or a path, got {type(state_dict_or_path).__name__}"
        )
    for key in ("ema", "model", "state_dict"):
        if key in sd and isinstance(sd[key], Mapping):
            return dict(sd[key])
    return dict(sd)


def _find_config(depth: int, hidden: int, patch: int, heads: int, mlp_ratio: float):
    for name, cfg in CONFIGS.items():
        if (cfg.depth, cfg.hidden_size, cfg.patch_size, cfg.num_heads, cfg.mlp_ratio) == (
            depth, hidden, patch, heads, mlp_ratio
        ):
            return name
    return DiTConfig(depth, hidden, patch, heads, mlp_ratio)


def student_steps(sd: StateDict) -> int:
    """K of an ARD student state dict, from its heads ``final_layer``, ``final_layer2``, …, ``final_layerK``
    (1 for a DiT)."""
    heads = sorted({int(m.group(1)) for k in sd if (m := re.match(r"final_layer(\d+)\.", k))})
    if heads != list(range(2, len(heads) + 2)):
        raise ValueError(f"state_dict: expected heads final_layer2..final_layerK, found final_layer{heads}")
    return len(heads) + 1


def _tokens_per_block(pos: torch.Tensor, steps: int) -> int:
    """Rows of ``pos_embed`` that one block's tokens use.

    An ARD student's checkpoint may hold the table of all K blocks, (1, K·T, C): the same T rows per
    block. K·T can itself be a square (4·256 = 32²), so the shape alone would read it as a grid 2×
    wider; the repeated rows tell the two apart.
    """
    rows = pos.shape[1]
    if steps > 1 and rows % steps == 0:
        blocks = pos.reshape(pos.shape[0], steps, rows // steps, *pos.shape[2:])
        if all(torch.equal(blocks[:, 0], blocks[:, k]) for k in range(1, steps)):
            return rows // steps
    return rows


def infer_dit_kwargs(sd: StateDict, num_heads: int = None) -> dict:
    """DiT constructor arguments implied by a DiT-layout state dict's shapes.

    Returns a dict with ``config`` (a name from CONFIGS when one matches, else a DiTConfig),
    ``input_size``, ``in_channels``, ``num_classes``, ``learn_sigma`` and ``class_dropout_prob``
    (0.1 when the label table has a null row, as every published DiT checkpoint has).
    """
    try:
        proj = sd["x_embedder.proj.weight"]
        pos = sd["pos_embed"]
        final = sd["final_layer.linear.weight"]
        table = sd["y_embedder.embedding_table.weight"]
        fc1 = sd["blocks.0.mlp.fc1.weight"]
    except KeyError as e:
        raise ValueError(f"state_dict: not a DiT state dict, missing {e.args[0]!r}") from None
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    tokens = _tokens_per_block(pos, student_steps(sd))
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"pos_embed: expected a square number of tokens, got shape {tuple(pos.shape)}")
    out_channels = final.shape[0] // (patch * patch)
    heads = num_heads if num_heads is not None else heads_for_width(hidden)
    return {
        "config": _find_config(depth, hidden, patch, heads, fc1.shape[0] / hidden),
        "input_size": grid * patch,
        "in_channels": in_channels,
        # Published checkpoints keep the null row (class dropout during training): num_classes = rows − 1.
        "num_classes": table.shape[0] - 1,
        "learn_sigma": out_channels == 2 * in_channels,
        "class_dropout_prob": 0.1,
    }


_BLOCK_MAP = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_TOP_MAP = {
    "pos_embed.proj": "x_embedder.proj",
    "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "transformer_blocks.0.norm1.emb.class_embedder.embedding_table": "y_embedder.embedding_table",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}


def diffusers_to_dit(model_or_state_dict, sample_size: int = None, num_heads: int = None):
    """diffusers ``DiTTransformer2DModel`` weights → ``(state_dict, dit_kwargs)`` in DiT's layout.

    Args:
        model_or_state_dict: the diffusers model (its config gives the head count and sizes) or its
            state dict (then ``sample_size`` is needed, and ``num_heads`` for a non-standard width).
        sample_size: latent side H = W (the diffusers config's ``sample_size``) for a bare state dict.
        num_heads: head count, for a bare state dict of non-standard width.

    Returns:
        A state dict that ``DiT(**dit_kwargs).load_state_dict(..., strict=True)`` accepts (its
        ``pos_embed`` is DiT's fixed sin-cos table, which diffusers does not store).

    Raises:
        ValueError: if the per-block copies of the timestep/label embedders differ (DiT has one).
    """
    from .dit import sincos_pos_embed_2d

    if isinstance(model_or_state_dict, Mapping):
        if sample_size is None:
            raise ValueError("sample_size: required with a bare state dict (diffusers stores no position table)")
        src = dict(model_or_state_dict)
    else:
        cfg = model_or_state_dict.config
        if getattr(cfg, "norm_type", "ada_norm_zero") != "ada_norm_zero":
            raise ValueError(f"model: expected a DiT with norm_type 'ada_norm_zero', got {cfg.norm_type!r}")
        num_heads = cfg.num_attention_heads if num_heads is None else num_heads
        sample_size = cfg.sample_size if sample_size is None else sample_size
        src = dict(model_or_state_dict.state_dict())
    out = {}
    blocks = set()
    for key, value in src.items():
        m = re.match(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m and ".norm1.emb." in key:
            i, rest, kind = m.groups()
            ref = f"transformer_blocks.0.{rest}.{kind}"
            if i != "0" and not torch.equal(value, src[ref]):
                raise ValueError(f"model_or_state_dict: {key} differs from block 0's copy; DiT shares one embedder")
            if i != "0":
                continue
        for old, new in _TOP_MAP.items():
            if key.startswith(old + "."):
                out[new + key[len(old):]] = value
                break
        else:
            if not m:
                raise ValueError(f"model_or_state_dict: unexpected diffusers key {key!r}")
            i, rest, kind = m.groups()
            blocks.add(int(i))
            if rest in _BLOCK_MAP:
                out[f"blocks.{i}.{_BLOCK_MAP[rest]}.{kind}"] = value
            elif rest not in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
                raise ValueError(f"model_or_state_dict: unexpected diffusers key {key!r}")
    for i in sorted(blocks):
        for kind in ("weight", "bias"):
            parts = [src[f"transformer_blocks.{i}.attn1.to_{p}.{kind}"] for p in "qkv"]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    hidden, in_channels, patch = out["x_embedder.proj.weight"].shape[:3]
    grid = sample_size // patch
    out["pos_embed"] = sincos_pos_embed_2d(hidden, grid)[None].to(out["x_embedder.proj.weight"].dtype)
    kwargs = infer_dit_kwargs(out, num_heads=num_heads)
    return out, kwargs


def dit_from_diffusers(model, **dit_kwargs):
    """A :class:`~ard_kernels.models.DiT` holding a diffusers ``DiTTransformer2DModel``'s weights."""
    from .dit import DiT

    sd, kwargs = diffusers_to_dit(model)
    kwargs.update(dit_kwargs)
    dit = DiT(kwargs.pop("config"), **kwargs)
    dit.load_state_dict(sd, strict=True)
    return dit
