"""Student samples for evaluation: ``python -m ard_kernels.samples --ckpt CKPT --num N --out DIR``.

Draws ``--num`` samples from a trained ARD student with its KV-cached K-step sampler
(:func:`ard_kernels.sampling.sample`), optionally decodes them with a diffusers ``AutoencoderKL``
(``--vae DIR``, a local ``save_pretrained`` directory: nothing is downloaded) and packs the images into
``samples.npz`` (``--npz``: ``arr_0``, (N, H, W, 3) uint8, the layout of the ADM evaluation suite that
FID/IS/precision/recall on ImageNet are computed with).

``--teacher`` samples a DiT checkpoint with its DDIM sampler instead (``--steps``, default 25, and
guidance 1.5 by default, DiT's FID setting): the baseline in the same files, seeds and labels.

The student comes from a training checkpoint directory (``--weights ema`` or ``model``; its
``state.json`` gives the size, history_layers, pattern and t_max it was trained with) or from a bare
state-dict file (then ``--history-layers`` is required: the weights do not tell it). K, the size,
the latent shape and the number of classes are read from the tensors.

Shard schema (``samples-{j:06d}.safetensors``, shard j holds global samples ``j·shard_size …``):

===========  ==================  ============================================================
key          shape               meaning
===========  ==================  ============================================================
latents      (n, C, H, W) fp32   the final latents
labels       (n,)   int64        class labels in [0, num_classes)
images       (n, H', W', 3) u8   the decoded images (only with ``--vae``)
===========  ==================  ============================================================

Noise and labels of shard j come from a CPU generator seeded with ``(seed, j)`` (``--labels
balanced``: sample i gets class ``i mod num_classes``), so the samples do not depend on the device,
the batch size or the number of ranks. Sharding over ``torchrun`` ranks, resume, atomic writes and
the manifest work as for :mod:`ard_kernels.trajectories` (:mod:`ard_kernels._shards`).
"""

from __future__ import annotations

import argparse
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import _shards
from .diffusion import SPACINGS, DDIMSampler
from .sampling import decode, sample, to_uint8_images

SCHEMA = "ard-samples/1"
NPZ = "samples.npz"
LABELS = ("random", "balanced")
SAMPLERS = ("ard", "ddim")
PRECISIONS = ("fp32", "bf16")


@dataclass
class SampleConfig(_shards.ShardedConfig):
    """What a sample set was drawn with; stored in every shard and in the manifest."""

    checkpoint: str
    num: int
    steps: int  # the student's K, or the teacher's DDIM steps S
    history_layers: int | None  # the student's N (None: the teacher)
    pattern: str | list | None
    t_max: float | None
    input_size: int
    in_channels: int
    num_classes: int
    cfg_scale: float = 1.0
    labels: str = "random"
    seed: int = 0
    shard_size: int = 1000
    image_size: int | None = None  # the decoded images' side; None: latents only
    vae: str | None = None  # the VAE directory decoded with
    precision: str = "fp32"  # "bf16": sampled under bf16 autocast
    sampler: str = "ard"  # "ard": the student's K cached steps; "ddim": the teacher's DDIM
    spacing: str | None = None  # ddim: the timestep respacing
    guidance_channels: int | None = None  # ddim: the ε channels guided (None: the model's)
    schema: str = SCHEMA

    stem = "samples"

    def validate(self) -> None:
        self.check_common()
        if self.labels not in LABELS:
            raise ValueError(f"labels: expected one of {LABELS}, got {self.labels!r}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale: expected >= 0, got {self.cfg_scale}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {SAMPLERS}, got {self.sampler!r}")

    def layout(self, n: int) -> dict[str, tuple[tuple, torch.dtype]]:
        c, s = self.in_channels, self.input_size
        out = {"latents": ((n, c, s, s), torch.float32), "labels": ((n,), torch.int64)}
        if self.image_size is not None:
            out["images"] = ((n, self.image_size, self.image_size, 3), torch.uint8)
        return out


def shard_inputs(cfg: SampleConfig, j: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_T (n, C, H, W) fp32 and labels (n,) int64 of shard j, from a CPU generator seeded by (seed, j)."""
    g = cfg.shard_generator(j)
    if cfg.labels == "balanced":
        labels = (j * cfg.shard_size + torch.arange(n)) % cfg.num_classes
    else:
        labels = torch.randint(0, cfg.num_classes, (n,), generator=g, dtype=torch.int64)
    noise = torch.randn((n, cfg.in_channels, cfg.input_size, cfg.input_size), generator=g)
    return noise, labels


def draw(model, cfg: SampleConfig, noise, y, use_cuda_graphs: bool = False) -> torch.Tensor:
    """Final latents from ``noise``: the student's K cached steps, or (``cfg.sampler == "ddim"``) the teacher's
    DDIM with ``cfg.steps`` steps, both guided by ``cfg.cfg_scale`` as DiT guides."""
    if cfg.sampler == "ddim":
        final, _ = DDIMSampler(cfg.steps, cfg.spacing).sample(model, noise, y, cfg.cfg_scale, record_indices=[0],
                                                              num_classes=cfg.num_classes,
                                                              guidance_channels=cfg.guidance_channels)
        return final
    return sample(model, noise, y, cfg_scale=cfg.cfg_scale, use_cuda_graphs=use_cuda_graphs)


def make_shard(model, cfg: SampleConfig, j: int, n: int, device="cpu", batch_size: int = 64,
               use_cuda_graphs: bool = False, vae=None, on_batch=None) -> dict:
    """Sample shard j with ``model`` (the student, or the teacher for ``cfg.sampler == "ddim"``):
    {"latents", "labels"[, "images"]} CPU tensors (``cfg.layout(n)``)."""
    _shards.check_batch_size(batch_size)
    noise, labels = shard_inputs(cfg, j, n)
    latents = torch.full_like(noise, float("nan"))  # a sample never written fails the shard's finite check
    images = torch.empty((n, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8) if vae is not None else None
    dev = torch.device(device)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        # CUDA graphs are captured per batch size: a short last batch is run eagerly, not captured anew.
        graphs = use_cuda_graphs and hi - lo == batch_size
        with autocast:
            x = draw(model, cfg, noise[lo:hi].to(dev), labels[lo:hi].to(dev), use_cuda_graphs=graphs)
        latents[lo:hi] = x.float().cpu()
        if vae is not None:
            img = to_uint8_images(decode(vae, x.float()))
            if img.shape[1:] != images.shape[1:]:
                raise ValueError(f"vae: decodes {cfg.input_size}² latents to {tuple(img.shape[1:])}, expected "
                                 f"{tuple(images.shape[1:])}")
            images[lo:hi] = img.cpu()
        if on_batch is not None:
            on_batch(hi - lo)
    out = {"latents": latents, "labels": labels}
    if images is not None:
        out["images"] = images
    return out


def load_student(ckpt, weights: str = "ema", history_layers: int | None = None, pattern=None,
                 t_max: float | None = None):
    """An ARDiT in eval mode from a training checkpoint directory or a state-dict file.

    A directory (``OUT/checkpoints/step-N``) gives ``{weights}.safetensors`` and, from its
    ``state.json``, the size and the history_layers / pattern / t_max it was trained with (an
    argument given here wins). A file needs ``history_layers``. K (the heads ``final_layer``,
    ``final_layer2``, …), the size when not named, the latent shape and the classes come from the
    tensors. Returns ``(student, source)``, source the weights file read.
    """
    from .models import ARDiT

    path = Path(ckpt)
    trained = {}
    if path.is_dir():
        if weights not in ("ema", "model"):
            raise ValueError(f"weights: expected 'ema' or 'model', got {weights!r}")
        state = path / "state.json"
        if not state.exists():
            raise ValueError(f"ckpt: {path} is a directory without state.json; expected a training checkpoint "
                             f"(OUT/checkpoints/step-N) or a state-dict file")
        trained = json.loads(state.read_text()).get("args", {})
        path = path / f"{weights}.safetensors"
    elif not path.exists():
        raise FileNotFoundError(f"ckpt: {path} does not exist")
    history_layers = history_layers if history_layers is not None else trained.get("history_layers")
    if history_layers is None:
        raise ValueError("history_layers: a state-dict file does not record it; pass --history-layers "
                         "(or point --ckpt at the training checkpoint directory)")
    student = ARDiT.from_checkpoint(path, config=trained.get("model"), history_layers=history_layers,
                                    pattern=pattern if pattern is not None else trained.get("pattern", "causal"),
                                    t_max=t_max if t_max is not None else trained.get("t_max", 999))
    return student.eval(), path


def load_vae(path, device):
    """A diffusers ``AutoencoderKL`` from a local directory (``save_pretrained`` layout), never downloaded."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError("vae: decoding needs diffusers (pip install diffusers)") from e
    if not Path(path).is_dir():
        raise FileNotFoundError(f"vae: {path} is not a directory (expected an AutoencoderKL saved with "
                                f"save_pretrained, e.g. a local copy of stabilityai/sd-vae-ft-ema)")
    return AutoencoderKL.from_pretrained(str(path), local_files_only=True).to(device).eval()


def decoded_size(vae, cfg: SampleConfig, device) -> int:
    """The side of the images ``vae`` decodes cfg's latents to (one tiny decode: configs differ in how)."""
    probe = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    img = decode(vae, probe)
    if img.shape[1] != 3 or img.shape[2] != img.shape[3]:
        raise ValueError(f"vae: expected square RGB images, decodes to {tuple(img.shape[1:])}")
    return int(img.shape[2])


def write_npz(cfg: SampleConfig, out_dir) -> Path:
    """``samples.npz`` with ``arr_0`` (N, H, W, 3) uint8, streamed shard by shard (constant memory).

    ``np.savez`` would need all N images in memory at once (9.8 GB for 50 000 at 256²); the same
    file is written here as a zip entry holding one ``.npy`` whose header is written first.
    """
    if cfg.image_size is None:
        raise ValueError("npz: needs decoded images (pass --vae)")
    out = Path(out_dir)
    s = cfg.image_size
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (cfg.num, s, s, 3)}
    tmp = out / f".{NPZ}.tmp-{os.getpid()}"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for j, n in cfg.shards():
                from safetensors import safe_open

                with safe_open(str(cfg.shard_path(out, j)), framework="pt") as shard:
                    images = shard.get_tensor("images")
                if images.shape[0] != n:
                    raise ValueError(f"npz: shard {j} holds {images.shape[0]} images, expected {n}")
                f.write(images.numpy().tobytes())
    os.replace(tmp, out / NPZ)
    return out / NPZ


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ard_kernels.samples", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True,
                   help="a training checkpoint directory (OUT/checkpoints/step-N) or a state-dict file; with "
                        "--teacher a DiT checkpoint (e.g. DiT-XL-2-256x256.pt)")
    p.add_argument("--teacher", action="store_true",
                   help="sample the DiT teacher with DDIM instead (the baseline a student's FID is read against)")
    p.add_argument("--steps", type=int, default=25, help="--teacher: DDIM steps S")
    p.add_argument("--spacing", choices=SPACINGS, default="ddim", help="--teacher: timestep respacing")
    p.add_argument("--guidance-channels", type=int, default=None,
                   help="--teacher: ε channels guided (default: the model's; DiT's own forward_with_cfg guides 3)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights of a checkpoint dir")
    # torchrun reads a bare "--num" as its --numa-binding: under torchrun spell it --num-samples.
    p.add_argument("--num", "--num-samples", dest="num", type=int, required=True,
                   help="number of samples (--num-samples under torchrun)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--history-layers", type=int, default=None, help="N (default: the checkpoint's)")
    p.add_argument("--pattern", default=None, help="block pattern (default: the checkpoint's, else causal)")
    p.add_argument("--t-max", type=float, default=None, help="time of the first block (default: the checkpoint's)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="guidance (default 1.0 for a student, which learnt a guided teacher; 1.5 for --teacher)")
    p.add_argument("--labels", choices=LABELS, default="random",
                   help="random classes, or balanced (sample i gets class i mod num_classes)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the K steps as one CUDA graph")
    p.add_argument("--vae", default=None, help="a local diffusers AutoencoderKL directory: decode to images")
    p.add_argument("--npz", action="store_true", help="also write samples.npz (arr_0: N×H×W×3 uint8; needs --vae)")
    _shards.add_run_arguments(p, batch_help="samples per sampler call, per rank")
    return p


def main(argv=None) -> int:
    from .trajectories import resolve_device

    args = _shards.parse_run_args(build_parser(), argv)
    if args.npz and args.vae is None:
        raise SystemExit("--npz needs --vae: the evaluation suite reads images, not latents")
    if args.teacher and args.cuda_graphs:
        raise SystemExit("--cuda-graphs: the teacher's DDIM loop is not captured; drop it with --teacher")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    common = dict(num=args.num, labels=args.labels, seed=args.seed, shard_size=args.shard_size,
                  precision=args.precision, vae=str(Path(args.vae).resolve()) if args.vae is not None else None)
    if args.teacher:
        from .models import DiT

        model, source = DiT.from_checkpoint(args.ckpt).eval(), Path(args.ckpt)
        cfg = SampleConfig(checkpoint=str(source.resolve()), steps=args.steps, history_layers=None, pattern=None,
                           t_max=None, input_size=model.input_size, in_channels=model.in_channels,
                           num_classes=model.num_classes, sampler="ddim", spacing=args.spacing,
                           guidance_channels=args.guidance_channels,
                           cfg_scale=1.5 if args.cfg_scale is None else args.cfg_scale, **common)
    else:
        model, source = load_student(args.ckpt, args.weights, args.history_layers, args.pattern, args.t_max)
        pattern = model.pattern if isinstance(model.pattern, str) else model.pattern_table.tolist()
        cfg = SampleConfig(checkpoint=str(Path(source).resolve()), steps=model.steps,
                           history_layers=model.history_layers, pattern=pattern, t_max=model.t_max,
                           input_size=model.input_size, in_channels=model.in_channels, num_classes=model.num_classes,
                           cfg_scale=1.0 if args.cfg_scale is None else args.cfg_scale, **common)
    model = model.to(device)
    vae = load_vae(args.vae, device) if args.vae is not None else None
    if vae is not None:
        cfg.image_size = decoded_size(vae, cfg, device)
    cfg.validate()

    def shard(j, n, on_batch):
        return make_shard(model, cfg, j, n, device, args.batch_size, args.cuda_graphs, vae, on_batch)

    _shards.make_shards(cfg, args.out, shard, rank, world, args.progress, desc="samples")

    def finish():
        path = _shards.write_manifest(cfg, args.out)
        print(f"wrote {cfg.num} samples in {len(cfg.shards())} shards; manifest {path}")
        if args.npz:
            print(f"wrote {write_npz(cfg, args.out)}")

    _shards.distributed_barrier_then(rank, world, finish)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
