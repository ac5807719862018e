"""The graphed training step: forward, loss and backward as one CUDA graph (``GraphedStep``, ``train --cuda-graphs``).

On the CPU :class:`_graph_helpers.EagerReplay` stands in for the graph runner (it re-runs the captured
function at every replay and copies the results into the captured outputs and gradients, as a replay
rewrites the graph's pool), so the step's logic is checked bit for bit against eager training; the ``meta``
device stands in for the GPU to show the captured work does no host↔device traffic. The real capture runs
under the ``cuda`` marker.
"""

import json
from pathlib import Path

import pytest
import torch
from _graph_helpers import HostWork, install_eager_replay
from _trajectory_helpers import write_tiny_trajectories

from ard_kernels import sampling
from ard_kernels.models import ARDiT
from ard_kernels.train import build_parser, check_cuda_graphs, train
from ard_kernels.training import ard_loss, teacher_forced_states
from ard_kernels.training.graphed_step import GraphedStep


@pytest.fixture
def graph_runner(monkeypatch):
    return install_eager_replay(monkeypatch)


def mlp_loss(model):
    def fn(x, target):
        out = model(x)
        per_row = (out - target).square().mean(dim=1)
        return per_row.mean(), per_row.detach()
    return fn


def eager_grads(model, fn, *inputs):
    model.zero_grad(set_to_none=True)
    loss, extra = fn(*inputs)
    loss.backward()
    return loss.detach(), extra, [p.grad.clone() for p in model.parameters()]


# ------------------------------------------------------------------------------ GraphedStep itself
def test_each_call_sets_the_gradients_of_its_own_batch(graph_runner):
    """Three batches: every call's loss, extras and gradients equal an eager step on that batch alone (set, never
    accumulated), p.grad stays the graph's buffer across calls, and the outputs are copies."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    fn = mlp_loss(model)
    step = GraphedStep(fn, model.parameters(), "cpu")
    buffers, kept = None, []
    for _ in range(3):
        x, target = torch.randn(4, 5), torch.randn(4, 3)
        want_loss, want_extra, want_grads = eager_grads(model, fn, x, target)
        model.zero_grad(set_to_none=True)  # what an optimizer loop may do between steps: the step restores them
        loss, extra = step(x, target)
        assert torch.equal(loss, want_loss) and torch.equal(extra, want_extra)
        for p, g in zip(model.parameters(), want_grads):
            assert torch.equal(p.grad, g)
        if buffers is None:
            buffers = [p.grad for p in model.parameters()]
        assert all(p.grad is b for p, b in zip(model.parameters(), buffers))
        kept.append(loss)
    assert graph_runner.captures == 1 and step.replays == 3
    assert len({float(v) for v in kept}) == 3  # each returned loss is its own copy, not the graph's buffer


def test_parameters_without_gradient_stay_none(graph_runner):
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 2), "unused": torch.nn.Linear(3, 2)})
    step = GraphedStep(lambda x: model["used"](x).square().mean(), model.parameters(), "cpu")
    for _ in range(2):
        (loss,) = step(torch.randn(4, 3))
    assert model["used"].weight.grad is not None and model["unused"].weight.grad is None


def test_graphed_step_errors(graph_runner):
    model = torch.nn.Linear(3, 2)
    step = GraphedStep(lambda x: model(x).square().mean(), model.parameters(), "cpu")
    with pytest.raises(ValueError, match=r"inputs\[0\]: expected a tensor"):
        step(3.0)
    step(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"inputs\[0\]: expected \(4, 3\) torch.float32 .*got \(5, 3\)"):
        step(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"inputs\[0\]: .*got \(4, 3\) torch.float64"):
        step(torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="inputs: expected 1 tensors as captured, got 2"):
        step(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="fn: expected a scalar loss that requires grad first, got Tensor of shape"):
        GraphedStep(lambda x: model(x), model.parameters(), "cpu")(torch.randn(4, 3))
    with pytest.raises(ValueError, match="params: expected at least one parameter"):
        GraphedStep(lambda x: x.sum(), [torch.nn.Parameter(torch.ones(2), requires_grad=False)], "cpu")


def test_needs_a_cuda_device_without_the_stand_in():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="device: CUDA graphs need a CUDA device, got cpu"):
        GraphedStep(lambda x: model(x).sum(), model.parameters(), "cpu")


def tiny_student(device="cpu", pattern="causal", history_layers=2, **backends):
    torch.manual_seed(0)
    student = ARDiT("DiT-tiny/2", history_layers=history_layers, steps=4, input_size=8, num_classes=10,
                    pattern=pattern, **backends)
    with torch.no_grad():  # zero-initialised heads and adaLN would give zero gradients to most of the trunk
        for p in student.parameters():
            if p.dim() > 1 and not p.abs().sum():
                p.normal_(std=0.02)
    return student.to(device).train()


def student_loss(student):
    def fn(x_t, targets, y, drop):
        return ard_loss(student.forward_train(teacher_forced_states(x_t, targets), y, drop), targets,
                        return_per_head=True)
    return fn


def student_batch(device, b=2):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(b, 4, 8, 8, generator=gen).to(device), torch.randn(b, 4, 4, 8, 8, generator=gen).to(device),
            torch.randint(0, 10, (b,), generator=gen).to(device), torch.tensor([1, 0] * (b // 2)).to(device))


# SDPA without a mask: no history, or a history pattern that is block-diagonal or sees every block.
CAPTURABLE_SDPA = [("causal", 0), ("diagonal", 2), (torch.ones(4, 4, dtype=torch.bool), 2)]


@pytest.mark.parametrize("pattern, history_layers", CAPTURABLE_SDPA, ids=["N0", "diagonal", "all-visible"])
def test_student_step_captures_no_host_work(graph_runner, pattern, history_layers):
    """On ``meta`` (the GPU's stand-in) the warm-up, the capture and every replay of an ARD student's forward,
    loss and backward run under the host-work guard: nothing a CUDA graph could not hold (the capturable SDPA
    cases: meta runs no Triton)."""
    student = tiny_student("meta", pattern, history_layers, attn_backend="sdpa", mod_backend="reference")
    sampling.check_capturable(student, "meta", training=True)
    step = GraphedStep(student_loss(student), student.parameters(), "meta")
    for _ in range(2):
        loss, per_head = step(*student_batch("meta"))
    assert loss.device.type == "meta" and per_head.shape == (4,) and graph_runner.captures == 1
    assert student.blocks[0].attn.qkv.weight.grad.device.type == "meta"


@pytest.mark.parametrize("pattern", ["causal", "window", "first"])
def test_masked_sdpa_training_is_refused_and_would_copy_host_data(graph_runner, pattern):
    """What check_capturable refuses in training (SDPA's host-built mask for the history layers) is what the
    guard catches in a capture: a host tensor sent to the device at every call."""
    student = tiny_student("meta", pattern, 2, attn_backend="sdpa", mod_backend="reference")
    with pytest.raises(ValueError, match=f"needs a host-built mask for the history layers' pattern '{pattern}'"):
        sampling.check_capturable(student, "meta", training=True)
    with pytest.raises(HostWork, match="copies host data"):
        GraphedStep(student_loss(student), student.parameters(), "meta")(*student_batch("meta"))
    sampling.check_capturable(student.set_backends(attn="flex"), "meta", training=True)
    with pytest.raises(ValueError, match="resolves to 'reference'"):
        sampling.check_capturable(student.set_backends(attn="reference"), "meta", training=True)


# ------------------------------------------------------------------------------ train --cuda-graphs
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_trajectories(tmp_path_factory.mktemp("traj"))


def args_for(data_dir, out, *extra, device="cpu"):
    return build_parser().parse_args(["--model", "DiT-tiny/2", "--data", str(data_dir), "--out", str(out),
                                      "--steps", "4", "--batch-size", "4", "--history-layers", "2",
                                      "--log-every", "1", "--ckpt-every", "2", "--lr", "1e-3", "--no-progress",
                                      "--seed", "1", "--class-dropout", "0.5", "--device", device, *extra])


def logged(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_graphed_training_is_eager_training_bit_for_bit(data_dir, tmp_path, graph_runner):
    """Four steps with label dropout: the same losses, gradient norms and weights as eager training; a run stopped
    after two steps and resumed with graphs ends in the same place (one capture per run). The CPU's attention
    backend is SDPA, capturable in training with a block-diagonal history pattern."""
    eager = train(args_for(data_dir, tmp_path / "eager", "--pattern", "diagonal"))
    graphed = train(args_for(data_dir, tmp_path / "graphed", "--pattern", "diagonal", "--cuda-graphs"))
    assert graph_runner.captures == 1
    for a, b in zip(logged(tmp_path / "eager"), logged(tmp_path / "graphed"), strict=True):
        assert (a["loss"], a["head_losses"], a["grad_norm"]) == (b["loss"], b["head_losses"], b["grad_norm"])
    for (name, a), b in zip(eager["student"].state_dict().items(), graphed["student"].state_dict().values()):
        assert torch.equal(a, b), name
    train(args_for(data_dir, tmp_path / "resumed", "--pattern", "diagonal", "--cuda-graphs", "--steps", "2"))
    resumed = train(args_for(data_dir, tmp_path / "resumed", "--pattern", "diagonal", "--cuda-graphs"))
    assert graph_runner.captures == 3 and resumed["step"] == 4
    for (name, a), b in zip(eager["student"].state_dict().items(), resumed["student"].state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("extra, world, match", [
    ((), 2, "one process only .*world size 2"),
    (("--fsdp",), 1, "one process only .*--fsdp"),
    (("--activation-checkpointing",), 1, "not with --activation-checkpointing"),
])
def test_cuda_graphs_refuse_what_they_do_not_capture(tmp_path, graph_runner, extra, world, match):
    with pytest.raises(ValueError, match=f"cuda_graphs: {match}"):
        check_cuda_graphs(args_for(tmp_path, tmp_path, "--cuda-graphs", *extra), world, torch.device("cpu"))


def test_cuda_graphs_need_a_cuda_device(data_dir, tmp_path):
    with pytest.raises(ValueError, match="cuda_graphs: needs a CUDA device, got cpu"):
        train(args_for(data_dir, tmp_path, "--cuda-graphs"))


def test_train_refuses_an_attention_backend_it_cannot_capture(data_dir, tmp_path, graph_runner):
    """The CPU's SDPA with the causal history pattern builds its mask on the host: refused before any step."""
    with pytest.raises(ValueError, match="needs a host-built mask for the history layers' pattern 'causal'"):
        train(args_for(data_dir, tmp_path, "--cuda-graphs"))
    assert graph_runner.captures == 0 and not (tmp_path / "log.jsonl").exists()


# ------------------------------------------------------------------------------------ the real thing
@pytest.mark.cuda
def test_cuda_graphed_student_step_matches_eager():
    """A real capture of the tiny student's bf16 forward + loss + backward (Triton attention and modulation):
    three batches, each replay's loss and gradients against an eager step on the same weights."""
    student = tiny_student("cuda", attn_backend="triton", mod_backend="triton")
    fn = student_loss(student)
    step = GraphedStep(fn, student.parameters(), "cuda", autocast_dtype=torch.bfloat16)
    params = list(student.parameters())
    for i in range(3):
        batch = [t.roll(i, 0) if t.dim() else t for t in student_batch("cuda", b=4)]
        student.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want, want_heads = fn(*batch)
        want.backward()
        want_grads = [p.grad.clone() for p in params]
        loss, heads = step(*batch)
        torch.testing.assert_close(loss, want.detach(), rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(heads, want_heads, rtol=1e-3, atol=1e-5)
        for p, g in zip(params, want_grads):
            torch.testing.assert_close(p.grad, g, rtol=2e-2, atol=1e-4)
        with torch.no_grad():  # an optimizer-like in-place update: the graph reads the weights by address
            for p in params:
                p.sub_(1e-2 * p.grad)
    assert step.replays == 3


@pytest.mark.cuda
def test_cuda_train_with_graphs_matches_eager(data_dir, tmp_path):
    """``train --cuda-graphs`` on the GPU (bf16 autocast, fused AdamW): the eager run's losses, closely."""
    eager = logged_run(data_dir, tmp_path / "eager")
    graphed = logged_run(data_dir, tmp_path / "graphed", "--cuda-graphs")
    for a, b in zip(eager, graphed, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-3 * abs(a["loss"]) + 1e-5, (a, b)


def logged_run(data_dir, out, *extra):
    train(args_for(data_dir, out, *extra, device="cuda"))
    return logged(out)


def test_bench_train_graphed_provider(graph_runner, tmp_path):
    """``bench_train``'s ``ardit-<backend>-graphs`` rows: both modes measured through one capture (the CPU
    stand-in here; its times mean nothing), beside the eager provider."""
    from benchmarks import bench_train

    rows = bench_train.main([*bench_train.QUICK_ARGV, "--providers", "ardit-auto,ardit-auto-graphs", "--modes",
                             "fwd_bwd,step", "--no-profile", "--out", str(tmp_path)])
    measured = {(r["provider"], r["mode"]): r for r in rows}
    assert set(measured) == {(p, m) for p in ("ardit-auto", "ardit-auto-graphs") for m in ("fwd_bwd", "step")}, rows
    assert all(r["ms"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert graph_runner.captures == 1
    assert (tmp_path / "train.json").exists()
