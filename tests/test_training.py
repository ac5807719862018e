"""ARD training: the loss, the EMA, checkpoints and resume, DDP and FSDP (gloo, 2 processes) against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _model_helpers import randomize
from _trajectory_helpers import write_tiny_trajectories
from safetensors.torch import load_file, save_file

from ard_kernels.models import ARDiT, DiT
from ard_kernels.train import build_parser, latest_checkpoint, train
from ard_kernels.training import ModelEMA, ard_loss, teacher_forced_states

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("c_out", [4, 8])
def test_ard_loss_is_mean_of_head_mses(c_out):
    pred = torch.randn(3, 4, c_out, 6, 6, requires_grad=True)
    targets = torch.randn(3, 4, 4, 6, 6)
    loss, per_head = ard_loss(pred, targets, return_per_head=True)
    want = torch.stack([torch.nn.functional.mse_loss(pred[:, k, :4], targets[:, k]) for k in range(4)])
    torch.testing.assert_close(per_head, want.detach())
    torch.testing.assert_close(loss, want.mean())
    loss.backward()
    assert pred.grad[:, :, 4:].abs().sum() == 0  # the variance channels are not supervised
    bf = ard_loss(pred.detach().bfloat16(), targets)
    assert bf.dtype == torch.float32


@pytest.mark.parametrize("shape", [(3, 4, 2, 6, 6), (3, 3, 8, 6, 6), (3, 4, 8, 5, 6)])
def test_ard_loss_shape_errors(shape):
    with pytest.raises(ValueError, match="pred"):
        ard_loss(torch.randn(shape), torch.randn(3, 4, 4, 6, 6))


def test_teacher_forced_states_errors():
    with pytest.raises(ValueError, match="x_T"):
        teacher_forced_states(torch.randn(2, 4, 6, 6), torch.randn(2, 4, 4, 6, 5))


def test_model_ema_follows_the_formula():
    model = torch.nn.Linear(3, 2)
    ema = ModelEMA(model, decay=0.9)
    w = [model.weight.detach().clone()]
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        w.append(model.weight.detach().clone())
        ema.update(model)
    want = w[1]  # the first update copies, as DiT's EMA starts from the weights
    for x in w[2:]:
        want = 0.9 * want + 0.1 * x
    torch.testing.assert_close(ema.module.weight, want)
    assert ema.num_updates == 3


def test_model_ema_equals_averaged_model_and_never_waits_for_the_device():
    """Three updates equal torch's AveragedModel with its EMA function bit for bit; on ``meta`` (standing in for
    the GPU) an update moves no host data to the device: the training step's queued work is never waited for
    (AveragedModel copies its CPU counter to the device at every update: a blocking copy)."""
    from _graph_helpers import HostWork, HostWorkGuard
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema, torch_ema = ModelEMA(model, 0.9), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
        ema.update(model)
        torch_ema.update_parameters(model)
    for (name, a), b in zip(ema.module.state_dict().items(), torch_ema.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert ema.num_updates == 3

    meta = torch.nn.Linear(3, 4, device="meta")
    on_device = ModelEMA(meta, 0.9)
    on_device.update(meta)
    with HostWorkGuard():
        on_device.update(meta)
    torch_on_device = AveragedModel(meta, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    torch_on_device.update_parameters(meta)  # the first update copies
    with pytest.raises(HostWork, match="copies host data"), HostWorkGuard():
        torch_on_device.update_parameters(meta)


# -------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_trajectories(tmp_path_factory.mktemp("traj"))


def args_for(data_dir, out, *extra):
    # --device cpu: these tests compare with CPU tensors and need exact resume, on a GPU machine too
    # (there train's default would be cuda with bf16; tests/test_training_gpu_paths.py covers that)
    return build_parser().parse_args(["--model", "DiT-tiny/2", "--data", str(data_dir), "--out", str(out),
                                      "--steps", "4", "--batch-size", "4", "--history-layers", "2",
                                      "--log-every", "1", "--ckpt-every", "2", "--lr", "1e-3", "--no-progress",
                                      "--seed", "1", "--device", "cpu", *extra])


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = train(args_for(data_dir, out))
    return out, result


def test_checkpoint_layout_and_contents(straight_run):
    out, result = straight_run
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step-0000004" and result["step"] == 4
    assert sorted(p.name for p in ckpt.iterdir()) == ["ema.safetensors", "model.safetensors", "optimizer.safetensors",
                                                      "state.json"]
    student = ARDiT("DiT-tiny/2", history_layers=2, steps=4, input_size=8, num_classes=10)
    student.load_state_dict(load_file(str(ckpt / "model.safetensors")))  # strict: the keys are ARDiT's own
    student.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
    for k, v in result["student"].state_dict().items():
        torch.testing.assert_close(student.state_dict()[k].to(v.dtype), result["ema"].module.state_dict()[k])
    opt = load_file(str(ckpt / "optimizer.safetensors"))
    assert "state/blocks.0.attn.qkv.weight/exp_avg" in opt and "state/pos_embed/exp_avg" not in opt
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 4 and state["ema_updates"] == 4
    rec = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert set(rec) >= {"step", "loss", "head_losses", "images_per_s", "grad_norm"} and len(rec["head_losses"]) == 4


def test_resume_continues_exactly(data_dir, straight_run, tmp_path):
    out, result = straight_run
    train(args_for(data_dir, tmp_path, "--steps", "2"))
    resumed = train(args_for(data_dir, tmp_path))  # same --out: picks up step 2
    assert resumed["step"] == 4
    torch.testing.assert_close(losses(tmp_path), losses(out), rtol=1e-5, atol=1e-6)
    for (k, a), b in zip(result["student"].state_dict().items(), resumed["student"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_init_from_teacher_checkpoint(data_dir, tmp_path):
    """--init-from copies the teacher's trunk and its final layer into every head (random teacher weights:
    DiT's own init zeroes the final layer, as the student's does, which would make the heads' check vacuous)."""
    teacher = randomize(DiT("DiT-tiny/2", input_size=8, num_classes=10), std=0.1)
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    result = train(args_for(data_dir, tmp_path / "run", "--init-from", str(tmp_path / "teacher.safetensors"),
                            "--steps", "1", "--lr", "0"))
    student = result["student"]
    torch.testing.assert_close(student.blocks[1].attn.qkv.weight, teacher.blocks[1].attn.qkv.weight)
    for head in student.heads:
        for name, want in teacher.final_layer.state_dict().items():
            torch.testing.assert_close(head.state_dict()[name], want)


def torchrun(args, timeout=150):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "ard_kernels.train", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("mode", [["--device", "cpu"], ["--device", "cpu", "--fsdp", "--activation-checkpointing"]],
                         ids=["ddp", "fsdp+ac"])
def test_two_processes_match_one(data_dir, straight_run, tmp_path, mode):
    """gloo, 2 ranks × 2 samples: the same global batches as one process × 4, so the same losses and weights."""
    out, result = straight_run
    a = args_for(data_dir, tmp_path)
    common = ["--model", a.model, "--data", a.data, "--out", a.out, "--batch-size", "4", "--history-layers", "2",
              "--log-every", "1", "--ckpt-every", "2", "--lr", "1e-3", "--no-progress", "--seed", "1", *mode]
    if "--fsdp" in mode:  # also resume a sharded run: 2 steps, then on to 4 from the checkpoint
        torchrun(common + ["--steps", "2"])
    torchrun(common + ["--steps", "4"])
    torch.testing.assert_close(losses(tmp_path), losses(out), rtol=1e-4, atol=1e-5)
    got = load_file(str(latest_checkpoint(tmp_path) / "model.safetensors"))
    for k, v in result["student"].state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)
    ema = load_file(str(latest_checkpoint(tmp_path) / "ema.safetensors"))
    for k, v in result["ema"].module.state_dict().items():
        torch.testing.assert_close(ema[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_label_dropout_is_reproduced_on_resume(data_dir, tmp_path):
    """Label dropout comes from a generator seeded by (seed, step, rank), not from the global RNG."""
    drop = ["--class-dropout", "0.5", "--steps", "3", "--ckpt-every", "1"]
    train(args_for(data_dir, tmp_path / "a", *drop))
    train(args_for(data_dir, tmp_path / "b", *drop, "--steps", "1"))
    torch.manual_seed(123)  # a different global RNG state must not matter
    train(args_for(data_dir, tmp_path / "b", *drop))
    torch.testing.assert_close(losses(tmp_path / "b"), losses(tmp_path / "a"), rtol=1e-5, atol=1e-6)
    # and the dropout did act: the null-class row trains only when labels are dropped (the losses cannot
    # show it here: from DiT's zero init the labels reach the output only after two updates)
    train(args_for(data_dir, tmp_path / "c", "--class-dropout", "0", "--steps", "3", "--ckpt-every", "1"))
    table = "y_embedder.embedding_table.weight"
    dropped, kept = (load_file(str(latest_checkpoint(tmp_path / r) / "model.safetensors"))[table] for r in "ac")
    assert not torch.equal(dropped[-1], kept[-1])


# ---------------------------------------------------------------------------------------- torch.compile
def test_training_forward_compiles_as_one_graph():
    """The student's whole training step (forward, ARD loss) traces with fullgraph=True, the Triton ops as custom ops
    (the interpreter on the CPU), and its compiled backward gives the eager gradients."""
    torch.manual_seed(0)
    student = randomize(ARDiT("DiT-tiny/2", history_layers=2, steps=4, input_size=8, num_classes=10)).train()
    student.set_backends(attn="triton", mod="triton")
    states, targets = torch.randn(2, 4, 4, 8, 8), torch.randn(2, 4, 4, 8, 8)
    y, drop = torch.tensor([1, 2]), torch.tensor([0, 1])

    def step(states, y, drop, targets):
        return ard_loss(student.forward_train(states, y, drop), targets)

    def grads(fn):
        student.zero_grad(set_to_none=True)
        loss = fn(states, y, drop, targets)
        loss.backward()
        return loss.detach(), [p.grad for p in student.parameters()]

    want_loss, want = grads(step)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    got_loss, got = grads(torch.compile(step, fullgraph=True, backend="aot_eager"))
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [[], ["--pattern", "diagonal", "--cuda-graphs"]], ids=["compile", "compile+graphs"])
def test_compiled_training_matches_eager(data_dir, tmp_path, monkeypatch, extra):
    """``--compile`` (here with the aot_eager backend: no code generation on the CPU) trains as the eager loop does,
    alone and under the CUDA-graph step (its capture stood in for on the CPU); checkpoint keys unchanged."""
    from _graph_helpers import install_eager_replay

    runner = install_eager_replay(monkeypatch)
    common = ["--steps", "3", "--class-dropout", "0.5", *extra]
    torch._dynamo.reset()
    eager = train(args_for(data_dir, tmp_path / "eager", *[a for a in common if a != "--cuda-graphs"]))
    compiled = train(args_for(data_dir, tmp_path / "compiled", *common, "--compile", "--compile-backend", "aot_eager"))
    torch.testing.assert_close(losses(tmp_path / "compiled"), losses(tmp_path / "eager"), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager["student"].state_dict().items(), compiled["student"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    saved = load_file(str(latest_checkpoint(tmp_path / "compiled") / "model.safetensors"))
    assert set(saved) == set(eager["student"].state_dict())
    assert runner.captures == (1 if extra else 0)
