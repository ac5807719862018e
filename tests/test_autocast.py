"""bf16 autocast, as training runs on the GPU: an fp32 residual stream meets bf16 Linear outputs.

CPU autocast runs the same code paths (the GPU's is the same rule with another device type), so
these catch dtype mismatches between the model, the ops and the KV cache before a GPU does.
"""

import json

import pytest
import torch
from _trajectory_helpers import write_tiny_trajectories

import ard_kernels as ak
from ard_kernels.models import ARDiT

BACKENDS = ["reference", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_modulation_ops_take_bf16_conditioning_with_fp32_x(backend):
    x = torch.randn(2, 7, 72, requires_grad=True)
    shift, scale, gate = (torch.randn(2, 3, 72, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    y = torch.randn(2, 7, 72, dtype=torch.bfloat16, requires_grad=True)
    out = ak.gated_residual(x, ak.modulated_layer_norm(x, shift, scale, 3, backend=backend) * y, gate, 3,
                            backend=backend)
    assert out.dtype == torch.float32
    grads = torch.autograd.grad(out.square().sum(), (x, shift, scale, gate, y))
    assert [g.dtype for g in grads] == [torch.float32] + [torch.bfloat16] * 4
    # against the same computation in fp32: only the inputs' bf16 rounding separates them
    ref = ak.gated_residual(x, ak.modulated_layer_norm(x, shift.float(), scale.float(), 3, backend="reference")
                            * y.float(), gate.float(), 3, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=1e-2)


def student(backend):
    torch.manual_seed(0)
    model = ARDiT("DiT-tiny/2", input_size=8, num_classes=10, history_layers=2, attn_backend=backend,
                  mod_backend=backend)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    return model


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_forward_train_and_backward_under_bf16_autocast(backend):
    model = student(backend)
    states, y = torch.randn(2, 4, 4, 8, 8), torch.tensor([1, 7])
    ref = model.forward_train(states, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_train(states, y)
    assert out.dtype == torch.bfloat16
    # outputs reach ~1.5 (std ~0.4); bf16 autocast moves them by at most ~0.05 here
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.02)
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_sampling_under_bf16_autocast_keeps_a_bf16_cache(cfg_scale, monkeypatch):
    from ard_kernels import sampling

    caches = []
    make_cache = sampling.make_cache

    def recording_make_cache(*args, **kwargs):
        caches.append(make_cache(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(sampling, "make_cache", recording_make_cache)
    model = student("auto").eval()
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 7])
    with torch.no_grad():
        ref = model.sample(noise, y, cfg_scale=cfg_scale)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.sample(noise, y, cfg_scale=cfg_scale)
    assert [c.dtype for c in caches] == [torch.float32, torch.bfloat16]
    assert all(c.length == c.capacity for c in caches)  # every step's k, v went through the cache
    # samples reach ~1.6; bf16 autocast moves them by ~0.01 here
    torch.testing.assert_close(out.float(), ref, atol=0.03, rtol=0.01)


def test_training_cli_with_bf16_autocast(tmp_path):
    from ard_kernels.train import build_parser, train

    write_tiny_trajectories(tmp_path / "traj", num=8, shard_size=8)
    args = build_parser().parse_args(["--model", "DiT-tiny/2", "--data", str(tmp_path / "traj"), "--out",
                                      str(tmp_path / "run"), "--steps", "3", "--batch-size", "4",
                                      "--history-layers", "2", "--log-every", "1", "--no-progress",
                                      "--precision", "bf16"])
    train(args)
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)


def _linear_input_dtypes(model, fn):
    """The dtypes of what each LayerNorm-fed Linear (qkv, fc1, the heads' linears, which the training forward
    runs as one batched GEMM) receives while ``model.forward_train`` runs in ``fn()``."""
    seen = []
    linears = [m for name, m in model.named_modules() if name.endswith(("attn.qkv", "mlp.fc1"))]
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype)) for m in linears]
    heads = model._heads_on_blocks
    model._heads_on_blocks = lambda h: (seen.append(h.dtype), heads(h))[1]
    try:
        fn()
    finally:
        del model._heads_on_blocks
        for h in hooks:
            h.remove()
    assert len(seen) == 2 * len(model.blocks) + 1
    return set(seen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_outputs_are_written_in_the_autocast_dtype(backend, monkeypatch):
    """Under autocast each modulated LayerNorm writes its output in bf16, which its Linears read as is:
    no fp32 → bf16 cast pass over the tokens (two per block and one per head before), and the same
    training forward and gradients up to bf16 rounding."""
    from ard_kernels.models import dit

    model = student(backend)
    states, y = torch.randn(2, 4, 4, 8, 8), torch.tensor([1, 7])

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.forward_train(states, y)
        grads = torch.autograd.grad(out.float().square().mean(), [p for p in model.parameters() if p.requires_grad])
        return out, grads

    assert _linear_input_dtypes(model, run) == {torch.bfloat16}
    out, grads = run()
    monkeypatch.setattr(dit, "linear_input_dtype", lambda x: x.dtype)  # fp32 outputs, cast inside the Linears
    assert _linear_input_dtypes(model, run) == {torch.float32}
    out_cast, grads_cast = run()
    torch.testing.assert_close(out.float(), out_cast.float(), atol=2e-2, rtol=2e-2)
    for g, gc in zip(grads, grads_cast):
        torch.testing.assert_close(g, gc, atol=2e-2, rtol=5e-2)
    with torch.no_grad():  # and in fp32 without autocast, fp32 as before
        assert _linear_input_dtypes(model, lambda: model.forward_train(states, y)) == {torch.float32}
