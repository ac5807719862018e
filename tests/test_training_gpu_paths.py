"""The GPU-only paths of training and trajectories, emulated on CPU where torch allows.

On a GPU, ``train`` picks bf16 autocast, fused AdamW, pinned memory, TF32 and DDP ``device_ids``;
FSDP2 gathers bf16 parameters; the teacher may sample under bf16 autocast. The decisions are plain
Python (tested here with a ``cuda`` device object and a recording ``set_device``); the numerics run
on CPU: CPU autocast follows the same rules, fused AdamW and FSDP2's MixedPrecisionPolicy exist on
CPU / gloo. One ``cuda`` test runs the real thing where there is a GPU.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _model_helpers import randomize
from _trajectory_helpers import write_tiny_trajectories
from safetensors.torch import load_file, save_file

import ard_kernels.train as train_mod
from ard_kernels.models import ARDiT, DiT
from ard_kernels.train import build_parser, device_policy, latest_checkpoint, setup_distributed, tf32_matmuls, train
from ard_kernels.trajectories import resolve_device

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ device decisions
@pytest.mark.parametrize("fsdp", [False, True])
def test_device_policy_on_cuda(fsdp):
    pol = device_policy(torch.device("cuda", 1), "auto", fsdp)
    assert pol == {"precision": "bf16", "fused_adamw": not fsdp, "pin_memory": True, "tf32": True,
                   "ddp_kwargs": {"device_ids": [1], "gradient_as_bucket_view": True}}
    assert device_policy(torch.device("cuda", 0), "fp32", fsdp)["precision"] == "fp32"


def test_device_policy_on_cpu():
    assert device_policy(torch.device("cpu"), "auto", False) == {
        "precision": "fp32", "fused_adamw": False, "pin_memory": False, "tf32": False,
        "ddp_kwargs": {"gradient_as_bucket_view": True}}
    assert device_policy(torch.device("cpu"), "bf16", True)["precision"] == "bf16"


@pytest.fixture
def fake_cuda(monkeypatch):
    """A recording torch.cuda.set_device, and a recording process-group init (no GPU, no NCCL here)."""
    calls = {"set_device": [], "init": []}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(d))
    monkeypatch.setattr(train_mod.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(train_mod.dist, "init_process_group", lambda backend, **kw: calls["init"].append(backend))
    return calls


@pytest.mark.parametrize("arg", ["cuda", "cuda:1"], ids=["bare", "indexed"])  # an id "cuda" reads as the marker
def test_setup_distributed_gives_each_rank_its_gpu(fake_cuda, monkeypatch, arg):
    """A bare ``--device cuda`` used to reach torch.cuda.set_device without an index (ValueError)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    rank, world, device = setup_distributed(arg)
    assert (rank, world, device) == (1, 2, torch.device("cuda", 1))
    assert fake_cuda["set_device"] == [torch.device("cuda", 1)] and fake_cuda["init"] == ["nccl"]
    assert device_policy(device, "auto", False)["ddp_kwargs"] == {"device_ids": [1], "gradient_as_bucket_view": True}


def test_setup_distributed_on_cpu_uses_gloo(fake_cuda, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert setup_distributed("cpu")[2] == torch.device("cpu")
    assert fake_cuda["set_device"] == [] and fake_cuda["init"] == ["gloo"]


@pytest.mark.parametrize("arg, want", [("cuda", "cuda:1"), ("cuda:0", "cuda:0"), ("cpu", "cpu")])
def test_trajectories_device_is_made_current(monkeypatch, arg, want):
    """Triton launches on the current device: rank r's teacher on cuda:r must make cuda:r current."""
    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", seen.append)
    assert resolve_device(arg, local_rank=1) == torch.device(want)
    assert seen == ([torch.device(want)] if want != "cpu" else [])


def test_tf32_is_scoped_to_training():
    """train() is called in-process too: TF32 must not leak into later fp32 work, and inside it every way
    of asking torch for the precision still answers (inductor asks when it compiles)."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        with tf32_matmuls(True):
            assert torch.get_float32_matmul_precision() == "high"
            assert torch.backends.cuda.matmul.allow_tf32 is True
            if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
                assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cuda.matmul.allow_tf32 is False
        with tf32_matmuls(False):
            assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


# ----------------------------------------------------------------------- bf16 training on the CPU
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_trajectories(tmp_path_factory.mktemp("traj"))


def cli(data_dir, out, *extra):
    return ["--model", "DiT-tiny/2", "--data", str(data_dir), "--out", str(out), "--steps", "4", "--batch-size", "4",
            "--history-layers", "2", "--log-every", "1", "--ckpt-every", "2", "--lr", "1e-3", "--no-progress",
            "--seed", "1", "--device", "cpu", *extra]


def run(data_dir, out, *extra):
    return train(build_parser().parse_args(cli(data_dir, out, *extra)))


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def bf16_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    return out, run(data_dir, out, "--precision", "bf16")


def test_bf16_with_activation_checkpointing_and_resume(data_dir, bf16_run, tmp_path):
    """Recomputation under autocast gives the same bf16 forward; a bf16 run resumes exactly."""
    out, result = bf16_run
    run(data_dir, tmp_path / "fp32")
    assert losses(out) != losses(tmp_path / "fp32")  # bf16 autocast did take effect (step 1: zero heads)
    torch.testing.assert_close(losses(out), losses(tmp_path / "fp32"), rtol=0.05, atol=1e-3)
    run(data_dir, tmp_path / "ac", "--precision", "bf16", "--activation-checkpointing", "--steps", "2")
    resumed = run(data_dir, tmp_path / "ac", "--precision", "bf16", "--activation-checkpointing")
    assert resumed["step"] == 4
    torch.testing.assert_close(losses(tmp_path / "ac"), losses(out), rtol=1e-5, atol=1e-6)
    for (k, a), b in zip(result["student"].state_dict().items(), resumed["student"].state_dict().values()):
        assert a.dtype == torch.float32 and b.dtype == torch.float32, k  # master weights stay fp32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert all(v.dtype == torch.float32 for v in result["ema"].state_dict().values())


def test_fused_adamw_and_pinned_loader_as_on_cuda(data_dir, bf16_run, tmp_path, monkeypatch):
    """The CUDA policy (auto → bf16, fused AdamW, pin_memory) on CPU: fused AdamW exists on CPU too,
    so its state (a float32 ``step`` tensor) goes through the checkpoint and resumes exactly."""
    out, _ = bf16_run
    cpu_policy = device_policy

    def cuda_like(device, precision, fsdp):
        pol = cpu_policy(torch.device("cuda", 0), precision, fsdp)
        return {**pol, "tf32": False, "ddp_kwargs": {}}

    monkeypatch.setattr(train_mod, "device_policy", cuda_like)
    built = []
    adamw = torch.optim.AdamW

    def recording_adamw(*args, **kwargs):
        built.append(adamw(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
        run(data_dir, tmp_path, "--steps", "2")
        resumed = run(data_dir, tmp_path)
    assert resumed["step"] == 4
    assert len(built) == 2 and all(opt.param_groups[0]["fused"] is True for opt in built)  # the fused kernels
    # precision auto resolved to bf16: the same losses as the explicit bf16 run (fused ≈ foreach AdamW)
    torch.testing.assert_close(losses(tmp_path), losses(out), rtol=1e-4, atol=1e-5)
    opt = load_file(str(latest_checkpoint(tmp_path) / "optimizer.safetensors"))
    step = opt["state/blocks.0.attn.qkv.weight/step"]
    assert step.dtype == torch.float32 and float(step) == 4.0


def torchrun(args, timeout=150):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "ard_kernels.train", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("mode", [[], ["--fsdp", "--activation-checkpointing"]], ids=["ddp", "fsdp+ac"])
def test_bf16_two_processes_match_one(data_dir, bf16_run, tmp_path, mode):
    """gloo, 2 ranks, bf16 autocast; FSDP2 with a bf16 MixedPrecisionPolicy (bf16 all-gathers, fp32
    master weights and gradient reduction), resumed from its sharded checkpoint: the one-process run."""
    out, result = bf16_run
    args = cli(data_dir, tmp_path, "--precision", "bf16", *mode)
    if mode:
        torchrun(args + ["--steps", "2"])  # the later --steps wins
    torchrun(args)
    # FSDP's bf16 all-gathers hand autocast the same bf16 weights it would have cast itself
    torch.testing.assert_close(losses(tmp_path), losses(out), rtol=1e-4, atol=1e-5)
    ckpt = latest_checkpoint(tmp_path)
    # Adam moves a weight by up to lr a step whatever its gradient's size: where bf16 rounding flips
    # a near-zero gradient, single weights part by up to steps·lr, so whole tensors are compared
    for name, want in (("model", result["student"].state_dict()), ("ema", result["ema"].module.state_dict())):
        got = load_file(str(ckpt / f"{name}.safetensors"))
        for k, v in want.items():
            assert got[k].dtype == torch.float32, (name, k)
            assert (got[k] - v).norm() <= 5e-2 * v.norm() + 1e-4, (name, k, float((got[k] - v).norm()))


def test_fsdp_bf16_in_one_process(tmp_path, monkeypatch):
    """FSDP2 with the bf16 policy: the mesh is on the training device even where the machine has a
    GPU (fully_shard's default mesh is on the accelerator), and the residual stream stays fp32."""
    import torch.distributed as dist

    from ard_kernels.train import StudentTrainStep, apply_fsdp

    monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))  # as on a GPU machine
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = StudentTrainStep(ARDiT("DiT-tiny/2", input_size=8, num_classes=10, history_layers=2, steps=4))
        apply_fsdp(model, bf16=True, device=torch.device("cpu"))
        sharded = [p for p in model.parameters() if hasattr(p, "device_mesh")]
        assert sharded and all(p.device_mesh.device_type == "cpu" and p.dtype == torch.float32 for p in sharded)
        seen = []
        for block in model.student.blocks:
            block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype) and None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(2, 4, 4, 8, 8), torch.tensor([1, 2]))
        assert seen == [torch.float32] * len(model.student.blocks) and out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        assert all(p.grad.dtype == torch.float32 for p in sharded if p.requires_grad)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------ bf16 teacher sampling
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_trajectories_with_bf16_teacher(tmp_path, dtype):
    """--precision bf16 samples the teacher under bf16 autocast (checked against DDIMSampler run here under
    autocast), stores the states in --dtype, and its targets stay near the fp32 run's: the bf16 error is a
    small part of what the teacher's ε contributes (a teacher with ε = 0 lands far away)."""
    from ard_kernels.diffusion import DDIMSampler
    from ard_kernels.trajectories import main

    # Random weights everywhere: DiT's own init (--random-init) zeroes the output layer, whose ε = 0 would
    # make the targets rescalings of x_T whatever the bf16 forward computed.
    teacher = randomize(DiT("DiT-tiny/2", input_size=8, num_classes=10), std=0.1)
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    common = ["--model", "DiT-tiny/2", "--num", "3", "--shard-size", "2", "--steps", "6",
              "--record-indices", "4,2,0", "--input-size", "8", "--num-classes", "10", "--no-progress",
              "--device", "cpu", "--cfg-scale", "1.5"]
    ckpt = ["--ckpt", str(tmp_path / "teacher.safetensors")]
    assert main(common + ckpt + ["--out", str(tmp_path / "fp32")]) == 0
    assert main(common + ckpt + ["--out", str(tmp_path / "bf16"), "--precision", "bf16", "--dtype", dtype]) == 0
    assert main(common + ["--random-init", "--out", str(tmp_path / "zero_eps")]) == 0
    for name in ("shard-000000.safetensors", "shard-000001.safetensors"):
        ref, got = load_file(str(tmp_path / "fp32" / name)), load_file(str(tmp_path / "bf16" / name))
        assert got["targets"].dtype == getattr(torch, dtype) and torch.isfinite(got["targets"]).all()
        torch.testing.assert_close(got["x_T"].float(), ref["x_T"], rtol=1e-2, atol=1e-2)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            _, want = DDIMSampler(6).sample(teacher, ref["x_T"], ref["labels"], 1.5, [4, 2, 0], num_classes=10)
        torch.testing.assert_close(got["targets"], want.to(got["targets"].dtype), rtol=1e-2, atol=1e-2)
        zero_eps = load_file(str(tmp_path / "zero_eps" / name))["targets"]
        bf16_error = (got["targets"].float() - ref["targets"]).norm()
        assert bf16_error < 0.1 * (zero_eps - ref["targets"]).norm(), bf16_error


# ------------------------------------------------------------------------------- the real thing
@pytest.mark.cuda
def test_cuda_training_bf16_fused_ac_resume(data_dir, tmp_path):
    """On a GPU: auto → bf16 autocast, fused AdamW, pinned loader, TF32 only inside train(); resume."""
    before = torch.get_float32_matmul_precision()
    args = cli(data_dir, tmp_path, "--activation-checkpointing")
    args[args.index("--device") + 1] = "cuda"
    train(build_parser().parse_args(args + ["--steps", "2"]))
    result = train(build_parser().parse_args(args))
    assert result["step"] == 4 and next(result["student"].parameters()).is_cuda
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(logged) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) and r["images_per_s"] > 0
                                    for r in logged)
    assert torch.get_float32_matmul_precision() == before
    student = ARDiT("DiT-tiny/2", history_layers=2, steps=4, input_size=8, num_classes=10)
    student.load_state_dict(load_file(str(latest_checkpoint(tmp_path) / "model.safetensors")))
    opt = load_file(str(latest_checkpoint(tmp_path) / "optimizer.safetensors"))
    assert float(opt["state/blocks.0.attn.qkv.weight/step"]) == 4.0


class _NoSync:
    """``torch.cuda.set_sync_debug_mode("error")`` for the block: any op that makes the host wait for the GPU
    (``.item()``, a blocking host↔device copy, ``nonzero``...) raises."""

    def __enter__(self):
        torch.cuda.synchronize()
        self.previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.previous)


@pytest.mark.cuda
@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "cuda-graphs"])
def test_cuda_training_step_never_waits_for_the_gpu(graphed):
    """After two warm-up steps (autotuning, plan timing, the capture), the training loop's step (forward, ARD loss,
    backward, clipping, fused AdamW, EMA), eager or graphed, makes no synchronising CUDA call."""
    from ard_kernels.training import ModelEMA, ard_loss, teacher_forced_states
    from ard_kernels.training.graphed_step import GraphedStep

    torch.manual_seed(0)
    student = randomize(ARDiT("DiT-tiny/2", history_layers=2, steps=4, input_size=8, num_classes=10)).cuda().train()
    student.set_backends(attn="triton", mod="triton")
    params = list(student.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ema = ModelEMA(student, 0.999)
    x_t, targets = torch.randn(4, 4, 8, 8, device="cuda"), torch.randn(4, 4, 4, 8, 8, device="cuda")
    y, drop = torch.randint(0, 10, (4,), device="cuda"), torch.tensor([0, 1, 0, 1], device="cuda")

    def loss_of(x_t, targets, y, drop):
        return ard_loss(student.forward_train(teacher_forced_states(x_t, targets), y, drop), targets)

    graphed_step = GraphedStep(loss_of, params, "cuda", autocast_dtype=torch.bfloat16) if graphed else None

    def step():
        if graphed_step is not None:
            graphed_step(x_t, targets, y, drop)
        else:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_of(x_t, targets, y, drop)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(student)

    step()
    step()
    with _NoSync():
        step()
        step()


@pytest.mark.cuda
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_cuda_eager_sampler_never_waits_for_the_gpu(cfg_scale):
    """The eager KV-cached sampler (Triton attention and modulation, the history cache) after a warm-up call."""
    from ard_kernels import sampling

    torch.manual_seed(0)
    student = randomize(ARDiT("DiT-tiny/2", history_layers=2, steps=4, input_size=8, num_classes=10)).cuda().eval()
    student.set_backends(attn="triton", mod="triton")
    noise, y = torch.randn(2, 4, 8, 8, device="cuda"), torch.tensor([3, 7], device="cuda")
    with torch.no_grad():
        sampling.sample_outputs(student, noise, y, cfg_scale=cfg_scale)
        with _NoSync():
            sampling.sample_outputs(student, noise, y, cfg_scale=cfg_scale)
