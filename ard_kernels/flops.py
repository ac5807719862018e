"""FLOP model of DiT sampling, step distillation and ARD: analytic per component, and measured.

FLOPs = 2 · MACs of the matrix products (the convention of :class:`torch.utils.flop_counter.FlopCounterMode`,
which counts ``mm``/``addmm``/``bmm``/convolution/SDPA/flex-attention and nothing else): bias adds,
LayerNorm, softmax, SiLU/GELU, modulation and embedding look-ups are left out of both counts, so
the analytic and the measured numbers describe the same work.

Per image and per step, with T query tokens, C hidden, p patch, c_in/c_out channels, M = mlp_ratio·C,
``kv`` keys per layer and ``rows`` conditioning rows per layer::

    patch embed   T · (c_in·p²) · C
    t embedder    rows_t · (256·C + C·C)            (frequency MLP, one row per time)
    y embedder    0                                  (table look-up)
    adaLN         rows · C · 6C   per block          (rows = blocks per image; T for per-token conditioning)
    QKV           T · C · 3C      per block
    attention     2 · T · kv · C  per block          (QKᵀ and PV over the allowed / cached keys)
    projection    T · C · C       per block
    MLP           2 · T · C · M   per block
    final head    rows · C · 2C + T · C · p²·c_out

Variants (``T`` = tokens per state, ``K`` steps, ``N`` history layers of ``depth``):

- teacher: S forwards over T tokens (DDIM; classifier-free guidance doubles every variant alike
  and is left out).
- step distillation: ARD with N = 0: K forwards over T tokens, attention within the block.
- ARD with the KV cache: step k runs only block k's T tokens; the lower N layers attend to the
  (k+1)·T cached keys, the upper ones to T. Extra over step distillation:
  ``Σ_k 2·T·(k·T)·C·N`` MACs (ARD.md: ≈ 5.44 GMACs, +1.15% for DiT-XL/2, K 4, N 6).
- ARD without a cache ("history recomputed"): step k feeds all k+1 blocks through the lower N
  layers again (each block with its own time embedding and conditioning row, block-causal
  attention over the allowed pairs only, i.e. (k+1)(k+2)/2 block pairs), because their keys and
  values in layer l need their hidden states after layers 0..l−1; the upper layers still see
  block k alone. The patch embedding of the history is recomputed too. ``overhead_percent_no_cache``
  is what dropping the cache costs: 100·(no cache − cache)/cache, 32.5% for DiT-XL/2, K 4, N 6
  (ARD.md: "≈ +32%"); against step distillation it is 34.1%
  (``overhead_percent_no_cache_vs_step_distillation``). The linear layers alone give the round
  figure Σ_k k·N / (K·depth) = 36/112 = 32.1%; the rest is the history's block-causal attention.
- published formulation: the same as ARD with the cache but with the adaLN Linear run on every
  token row (``conditioning="token"``) as the reference code does.

Measured: :func:`measured_sampling_flops` runs :meth:`ARDiT.sample` (all K cached steps) and, for the
no-cache variant, :func:`ard_kernels.sampling.sample_recomputing_history` (the same outputs, the history
recomputed at every step) under ``FlopCounterMode`` on the meta device (no weights allocated, so
DiT-XL/2 costs nothing), and :func:`measured_forward_flops` one :meth:`DiT.forward` for the teacher.

CLI: ``python -m ard_kernels.flops --model DiT-XL/2 --history-layers 6 --steps 4 --json`` prints one
JSON object; ``--table`` prints the overhead for N ∈ {0, 1, 3, 6, 12, 28}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Sequence

import torch

FREQ_DIM = 256  # width of DiT's sinusoidal timestep embedding
TABLE_HISTORY_LAYERS = (0, 1, 3, 6, 12, 28)


@dataclasses.dataclass(frozen=True)
class DiTShape:
    """The sizes of a DiT that its FLOPs depend on."""

    depth: int
    hidden: int
    heads: int
    patch: int
    input_size: int = 32
    in_channels: int = 4
    out_channels: int = 8  # learn_sigma doubles the 4 latent channels
    mlp_ratio: float = 4.0

    @property
    def tokens(self) -> int:
        """Tokens per state: (input_size / patch)²."""
        return (self.input_size // self.patch) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)


def shape_from_model(model) -> DiTShape:
    """Read a :class:`DiTShape` off a DiT/ARDiT instance (works for meta-device models too)."""
    proj = model.x_embedder.proj
    fc1 = model.blocks[0].mlp.fc1
    hidden = proj.out_channels
    heads = getattr(model, "num_heads", None) or model.blocks[0].attn.num_heads
    return DiTShape(
        depth=len(model.blocks),
        hidden=hidden,
        heads=int(heads),
        patch=int(proj.kernel_size[0]),
        input_size=int(getattr(model, "input_size", int(round(model.pos_embed.shape[1] ** 0.5)) * proj.kernel_size[0])),
        in_channels=proj.in_channels,
        out_channels=int(model.out_channels),
        mlp_ratio=fc1.out_features / hidden,
    )


def shape_from_config(name: str, input_size: int = 32, learn_sigma: bool = True) -> DiTShape:
    """The :class:`DiTShape` of a named config ("DiT-XL/2", "DiT-tiny/2", …), 4 latent channels."""
    from ard_kernels.models.configs import get_config  # the one table of sizes

    cfg = get_config(name)
    return DiTShape(cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, input_size, 4,
                    8 if learn_sigma else 4, cfg.mlp_ratio)


# --------------------------------------------------------------------------------------------
# Analytic model
# --------------------------------------------------------------------------------------------

COMPONENTS = ("patch_embed", "t_embed", "adaln", "qkv", "attention", "proj", "mlp", "final")


def _add(total: dict[str, int], part: dict[str, int]) -> dict[str, int]:
    for key, val in part.items():
        total[key] = total.get(key, 0) + val
    return total


def forward_macs(
    s: DiTShape,
    layer_tokens: Sequence[int],
    layer_keys: Sequence[int],
    layer_rows: Sequence[int],
    embed_tokens: int,
    t_rows: int,
    head_tokens: int,
    head_rows: int = 1,
) -> dict[str, int]:
    """MACs of one forward per image, per component.

    Args:
        s: model sizes.
        layer_tokens: query tokens per block (len = depth).
        layer_keys: Σ over query tokens of the keys each one attends to, per block (the attention
            term is ``2 · layer_keys[l] · C``: QKᵀ and PV).
        layer_rows: adaLN conditioning rows per block (1 per conditioned block, or the tokens
            when conditioning is per token).
        embed_tokens: tokens through the patch embedding.
        t_rows: rows through the timestep MLP.
        head_tokens, head_rows: tokens and conditioning rows of the final layer.
    """
    c, m = s.hidden, s.mlp_hidden
    out: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    out["patch_embed"] = embed_tokens * s.in_channels * s.patch**2 * c
    out["t_embed"] = t_rows * (FREQ_DIM * c + c * c)
    for n, kv, rows in zip(layer_tokens, layer_keys, layer_rows):
        out["adaln"] += rows * c * 6 * c
        out["qkv"] += n * c * 3 * c
        out["attention"] += 2 * kv * c
        out["proj"] += n * c * c
        out["mlp"] += 2 * n * c * m
    out["final"] = head_rows * c * 2 * c + head_tokens * c * s.patch**2 * s.out_channels
    return out


def _block_causal_keys(nblocks: int, tokens: int) -> int:
    """Σ over query tokens of the allowed keys under block-causal (M4): T² · nb(nb+1)/2."""
    return tokens * tokens * nblocks * (nblocks + 1) // 2


def teacher_macs(s: DiTShape, steps: int = 25) -> dict[str, int]:
    """``steps`` full forwards over T tokens (the DDIM teacher)."""
    t, d = s.tokens, s.depth
    one = forward_macs(s, [t] * d, [t * t] * d, [1] * d, t, 1, t)
    return {k: v * steps for k, v in one.items()}


def ard_macs(s: DiTShape, history_layers: int, steps: int = 4, cache: bool = True,
             conditioning: str = "block") -> dict[str, int]:
    """MACs per image of the K-step ARD sampler (history_layers = 0: step distillation).

    ``cache=False`` recomputes the history through the lower layers at every step (module
    docstring); ``conditioning="token"`` runs the adaLN Linear on every token row (published code).
    """
    if not 0 <= history_layers <= s.depth:
        raise ValueError(f"history_layers: expected 0 <= N <= depth={s.depth}, got {history_layers}")
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    if conditioning not in ("block", "token"):
        raise ValueError(f"conditioning: expected 'block' or 'token', got {conditioning!r}")
    t, n, d = s.tokens, history_layers, s.depth
    total: dict[str, int] = {}
    for k in range(steps):
        if cache or n == 0:
            blocks_lo, keys_lo, embed = 1, t * t * (k + 1), t
        else:
            blocks_lo, keys_lo, embed = k + 1, _block_causal_keys(k + 1, t), t * (k + 1)
        tokens = [t * blocks_lo] * n + [t] * (d - n)
        keys = [keys_lo] * n + [t * t] * (d - n)
        rows = [blocks_lo] * n + [1] * (d - n)
        if conditioning == "token":
            rows = tokens
        t_rows = blocks_lo if n else 1
        head_rows = t if conditioning == "token" else 1
        _add(total, forward_macs(s, tokens, keys, rows, embed, t_rows, t, head_rows))
    return total


def ard_train_macs(s: DiTShape, history_layers: int, steps: int = 4) -> dict[str, int]:
    """MACs per image of one training forward: all K blocks at once (K·T tokens, K heads on T each)."""
    t, n, d, k = s.tokens, history_layers, s.depth, steps
    keys = [_block_causal_keys(k, t)] * n + [k * t * t] * (d - n)
    out = forward_macs(s, [k * t] * d, keys, [k] * d, k * t, k, k * t, k)
    return out


def gflops(macs: dict[str, int]) -> float:
    """Total GFLOPs (2 FLOPs per MAC) of a per-component MAC dict."""
    return 2 * sum(macs.values()) / 1e9


def overhead_percent(variant: float, baseline: float) -> float:
    return 100.0 * (variant - baseline) / baseline


# --------------------------------------------------------------------------------------------
# Measured with FlopCounterMode
# --------------------------------------------------------------------------------------------

def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu`` (the counter has no formula for it)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _addmm_activation_flops(bias_shape, mat1_shape, mat2_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten._addmm_activation`` (fc1 + GELU in one GEMM on CUDA), counted as its addmm."""
    m, k = mat1_shape
    return 2 * m * k * mat2_shape[1]


def _count(fn) -> int:
    """Total FLOPs FlopCounterMode registers while ``fn()`` runs (CPU flash SDPA and the fused
    fc1 + GELU GEMM of CUDA inference included: the counter has no formula for either)."""
    from torch.utils.flop_counter import FlopCounterMode

    custom = {torch.ops.aten._addmm_activation: _addmm_activation_flops}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        custom[cpu_sdpa] = _cpu_sdpa_flops
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    return int(counter.get_total_flops())


@contextlib.contextmanager
def _parameters_on(device: str):
    """Build modules with their parameters on ``device`` (meta: no storage) while every other tensor
    a constructor makes (pattern tables, launch plans) stays on the CPU, as the model expects."""
    if torch.device(device).type != "meta":
        with torch.device(device):
            yield
        return
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def measured_sampling_flops(config: str, history_layers: int, steps: int = 4, batch: int = 1,
                            device: str = "meta", input_size: int = 32, cache: bool = True, **model_kwargs) -> int:
    """FLOPs per image that FlopCounterMode sees in ``ARDiT.sample`` (all K cached steps, no CFG), or with
    ``cache=False`` in :func:`ard_kernels.sampling.sample_recomputing_history` (the history recomputed).

    On ``device="meta"`` nothing is allocated: the counter only needs shapes. In the cached path
    no attention mask is needed (a step's queries may see every cached key), so any attention
    backend (SDPA, or the dense reference) performs exactly the analytic attention work — for
    the default "causal" pattern, whose allowed keys are one contiguous run. ARDiT embeds the K
    block times once per batch, so the count equals the analytic one exactly at ``batch=1``; at
    larger batches that (tiny) row work is shared between the samples.
    """
    from ard_kernels.models import ARDiT

    with _parameters_on(device):
        model = ARDiT(config, history_layers=history_layers, steps=steps, input_size=input_size,
                      **model_kwargs).eval()
    noise = torch.randn(batch, model.in_channels, input_size, input_size, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    if cache:
        run = lambda: model.sample(noise, y)  # noqa: E731
    else:
        from ard_kernels.sampling import sample_recomputing_history

        run = lambda: sample_recomputing_history(model, noise, y)  # noqa: E731
    with torch.no_grad():
        flops = _count(run)
    return flops // batch


def measured_forward_flops(config: str, batch: int = 1, device: str = "meta", input_size: int = 32) -> int:
    """FLOPs per image of one teacher ``DiT.forward`` over T tokens."""
    from ard_kernels.models import DiT

    with _parameters_on(device):
        model = DiT(config, input_size=input_size).eval()
    x = torch.randn(batch, model.in_channels, input_size, input_size, device=device)
    t = torch.full((batch,), 500.0, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    with torch.no_grad():
        flops = _count(lambda: model(x, t, y))
    return flops // batch


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def report(config: str = "DiT-XL/2", history_layers: int = 6, steps: int = 4, teacher_steps: int = 25,
           input_size: int = 32, measure: bool = True, device: str = "meta") -> dict:
    """All variants' GFLOPs per image, the overheads over step distillation, analytic and measured.

    ``overhead_percent_analytic`` / ``_measured`` = 100 · (ARD − step distillation) / step distillation,
    both K steps; ``overhead_percent_no_cache`` = 100 · (ARD without cache − ARD) / ARD.
    """
    s = shape_from_config(config, input_size=input_size)
    sd = ard_macs(s, 0, steps)
    ard = ard_macs(s, history_layers, steps)
    nocache = ard_macs(s, history_layers, steps, cache=False)
    pub = ard_macs(s, history_layers, steps, conditioning="token")
    pub_sd = ard_macs(s, 0, steps, conditioning="token")
    teacher = teacher_macs(s, teacher_steps)
    out = {
        "model": config,
        "history_layers": history_layers,
        "steps": steps,
        "teacher_steps": teacher_steps,
        "tokens_per_state": s.tokens,
        "gflops_forward": gflops(teacher_macs(s, 1)),
        "gflops_teacher": gflops(teacher),
        "gflops_step_distillation": gflops(sd),
        "gflops_ard": gflops(ard),
        "gflops_ard_no_cache": gflops(nocache),
        "gflops_ard_published_formulation": gflops(pub),
        "gflops_ard_train_forward": gflops(ard_train_macs(s, history_layers, steps)),
        "history_attention_gmacs": (sum(ard.values()) - sum(sd.values())) / 1e9,
        "overhead_percent_analytic": overhead_percent(gflops(ard), gflops(sd)),
        "overhead_percent_no_cache": overhead_percent(gflops(nocache), gflops(ard)),
        "overhead_percent_no_cache_vs_step_distillation": overhead_percent(gflops(nocache), gflops(sd)),
        "overhead_percent_published_formulation": overhead_percent(gflops(pub), gflops(pub_sd)),
        "components_gflops_ard": {k: 2 * v / 1e9 for k, v in ard.items()},
        "overhead_percent_measured": None,
        "overhead_percent_no_cache_measured": None,
        "gflops_ard_measured": None,
        "gflops_ard_no_cache_measured": None,
        "gflops_step_distillation_measured": None,
        "gflops_forward_measured": None,
        "measured_error": None,
    }
    if measure:
        try:
            m_ard = measured_sampling_flops(config, history_layers, steps, device=device, input_size=input_size)
            m_sd = measured_sampling_flops(config, 0, steps, device=device, input_size=input_size)
            out["gflops_ard_measured"] = m_ard / 1e9
            out["gflops_step_distillation_measured"] = m_sd / 1e9
            out["overhead_percent_measured"] = overhead_percent(m_ard, m_sd)
            m_nc = measured_sampling_flops(config, history_layers, steps, device=device, input_size=input_size,
                                           cache=False)
            out["gflops_ard_no_cache_measured"] = m_nc / 1e9
            out["overhead_percent_no_cache_measured"] = overhead_percent(m_nc, m_ard)
            out["gflops_forward_measured"] = measured_forward_flops(config, device=device, input_size=input_size) / 1e9
        except Exception as exc:  # the report stays useful without the model (e.g. partial install)
            out["measured_error"] = f"{type(exc).__name__}: {exc}"
    return out


def table(config: str = "DiT-XL/2", steps: int = 4, history: Sequence[int] = TABLE_HISTORY_LAYERS,
          measure: bool = True, device: str = "meta") -> list[dict]:
    """One row per N: GFLOPs and overhead with the cache, without it, and measured."""
    s = shape_from_config(config)
    rows = []
    m_sd = None
    for n in history:
        if n > s.depth:
            continue
        r = report(config, n, steps, measure=False)
        row = {
            "N": n,
            "gflops_ard": round(r["gflops_ard"], 2),
            "overhead_%": round(r["overhead_percent_analytic"], 3),
            "overhead_measured_%": None,
            "no_cache_over_cache_%": round(r["overhead_percent_no_cache"], 2),
            "no_cache_over_step_distillation_%": round(r["overhead_percent_no_cache_vs_step_distillation"], 2),
        }
        if measure:
            try:
                if m_sd is None:
                    m_sd = measured_sampling_flops(config, 0, steps, device=device)
                m = measured_sampling_flops(config, n, steps, device=device)
                row["overhead_measured_%"] = round(overhead_percent(m, m_sd), 3)
            except Exception as exc:
                row["overhead_measured_%"] = f"error: {type(exc).__name__}"
                measure = False
        rows.append(row)
    return rows


def _markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("–" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ard_kernels.flops", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--history-layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--no-measure", action="store_true", help="analytic only (skip FlopCounterMode)")
    p.add_argument("--device", default="meta", help="device of the measured forward (meta: no allocation)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--table", action="store_true", help=f"overhead table over N in {TABLE_HISTORY_LAYERS}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.table:
        rows = table(a.model, a.steps, measure=not a.no_measure, device=a.device)
        print(json.dumps(rows) if a.json else _markdown(rows))
        return 0
    r = report(a.model, a.history_layers, a.steps, a.teacher_steps, a.input_size, not a.no_measure, a.device)
    if a.json:
        print(json.dumps(r))
        return 0
    for key, val in r.items():
        if isinstance(val, float):
            val = f"{val:.4f}"
        print(f"{key:40s} {val}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
