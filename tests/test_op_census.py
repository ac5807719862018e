"""The launch plan of the sampler and the training forward (ard_kernels.op_census), counted without a GPU.

On the CPU torch: the counting itself (classification, phases, the CLI) on the CPU path. Under the GPU
machines' CUDA torch 2.11 (``.venv-gpu-stack``, the extension built against it): DiT-XL/2's CUDA path on
fake CUDA tensors, where the counts are the kernels a GPU would run: one history-cache launch per history
layer per step, ARD's history adding exactly N launches per step over step distillation, every attention
and LayerNorm one fused ard_kernels op, one SiLU for all the adaLN Linears.
"""

import json
import os
import subprocess

import pytest
import torch
from _gpu_stack import ROOT, gpu_stack_env, gpu_stack_python

from ard_kernels import op_census

aten = torch.ops.aten


def test_views_and_allocations_launch_nothing():
    assert not op_census.launches_op(aten.view.default)
    assert not op_census.launches_op(aten.transpose.int)
    assert not op_census.launches_op(aten.empty.memory_format)
    assert not op_census.launches_op(aten._unsafe_view.default)
    assert op_census.launches_op(aten.addmm.default)
    assert op_census.launches_op(aten.clone.default)
    assert op_census.launches_op(aten.add.Tensor)


@pytest.mark.parametrize("name, kind", [
    ("aten.addmm.default", "gemm"), ("aten._addmm_activation.default", "gemm"), ("aten.convolution.default", "gemm"),
    ("ard_kernels.block_attention_qkv_fwd.default", "attention"),
    ("aten._scaled_dot_product_flash_attention.default", "attention"),
    ("ard_kernels.gated_residual_modulated_layer_norm_inplace.default", "norm"),
    ("ard_kernels.qkv_split_append.default", "kv_cache"), ("ard_kernels.qkv_append.default", "kv_cache"),
    ("aten.cat.default", "copy"), ("aten.copy_.default", "copy"),
    ("aten.silu.default", "other"), ("aten.add.Tensor", "other"),
])
def test_kind_of(name, kind):
    assert op_census.kind_of(name) == kind


def test_cpu_sampler_census_has_a_phase_per_step():
    """The CPU path (reference ops, the PyTorch cache): every step dispatches the same ops, the last one
    also stacks the K outputs; the history costs launches on top of step distillation."""
    ard = op_census.sampler_census("DiT-tiny/2", history_layers=2, steps=4, batch=2, device="cpu",
                                   dtype=torch.float32, input_size=8)
    assert list(ard["phases"]) == ["prelude", "step 0", "step 1", "step 2", "step 3"]
    assert ard["cache_backend"] == "torch"
    per_step = ard["per_step_launches"]
    assert per_step[:3] == [per_step[0]] * 3 and per_step[3] == per_step[0] + 1, per_step
    last = ard["phases"]["step 3"]["ops"]
    assert last["aten.stack.default"] == 1 and "aten.stack.default" not in ard["phases"]["step 0"]["ops"]
    sd = op_census.sampler_census("DiT-tiny/2", history_layers=0, steps=4, batch=2, device="cpu",
                                  dtype=torch.float32, input_size=8)
    assert sd["cache_backend"] is None
    assert all(a > b for a, b in zip(per_step, sd["per_step_launches"])), (per_step, sd["per_step_launches"])


def test_cpu_teacher_census_has_a_phase_per_ddim_step():
    teacher = op_census.teacher_census("DiT-tiny/2", steps=3, batch=2, cfg_scale=1.5, device="cpu",
                                       dtype=torch.float32, input_size=8)
    assert list(teacher["phases"]) == ["prelude", "step 0", "step 1", "step 2"]
    assert len(teacher["per_step_launches"]) == 3 and min(teacher["per_step_launches"]) > 0
    assert teacher["config"]["teacher_steps"] == 3


def test_cli_prints_json_and_a_table(capsys):
    args = ["--device", "cpu", "--model", "DiT-tiny/2", "--history-layers", "1", "--steps", "2",
            "--input-size", "8", "--dtype", "float32"]
    assert op_census.main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["history_layers"] == 1 and len(result["per_step_launches"]) == 2
    assert op_census.main([*args, "--train"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| phase | launches |") and "| forward_train |" in table
    assert op_census.main(["--device", "cpu", "--model", "DiT-tiny/2", "--teacher", "2", "--input-size", "8",
                           "--dtype", "float32", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["per_step_launches"]) == 2


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs the interpreter")
def test_training_backward_launch_plan():
    """A training step's backward (fake CPU tensors; the Triton backends dispatch the custom ops the CUDA path
    does): one fused backward per attention and per LayerNorm, and no zero-filled gradient buffers: outputs
    nobody uses (the LayerNorm statistics, the log-sum-exp, the last residual) reach the backwards as None."""
    depth = 12  # DiT-S/2
    result = op_census.train_census("DiT-S/2", history_layers=2, batch=2, device="cpu", dtype=torch.float32,
                                    backward=True, backend="triton")
    fwd, bwd = (result["phases"][name]["ops"] for name in ("forward_train", "backward"))
    assert fwd["ard_kernels.block_attention_qkv_fwd.default"] == bwd["ard_kernels.block_attention_qkv_bwd.default"] \
        == depth
    assert bwd["ard_kernels.gated_residual_modulated_layer_norm_bwd.default"] == 2 * depth
    assert bwd["ard_kernels.modulated_layer_norm_bwd.default"] == 1
    zero_fills = {n: c for n, c in bwd.items() if n.startswith(("aten.zeros", "aten.zero_", "aten.fill", "aten.full"))}
    assert not zero_fills, zero_fills
    assert bwd["aten.gelu_backward.default"] == depth and bwd["aten.silu_backward.default"] == 2  # one shared SiLU
    with pytest.raises(ValueError, match="backward: fake CUDA tensors cannot run a backward"):
        op_census.train_census("DiT-S/2", backward=True)


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build: --device cuda is valid")
def test_cli_refuses_cuda_on_a_cpu_torch(capsys):
    with pytest.raises(SystemExit) as exc:
        op_census.main(["--device", "cuda"])
    assert exc.value.code == 2 and "CPU build" in capsys.readouterr().err


# ------------------------------------------------------------------ DiT-XL/2 on CUDA (the GPU stack)
DEPTH, N, K = 28, 6, 4
_CENSUSES = """
import json, torch
from ard_kernels import op_census as oc
from benchmarks.published_ard import PublishedARD
out = {
    "ard": oc.sampler_census("DiT-XL/2", history_layers=6),
    "step_distilled": oc.sampler_census("DiT-XL/2", history_layers=0),
    "ard_torch_cache": oc.sampler_census("DiT-XL/2", history_layers=6, cache_backend="torch"),
    "ard_cfg": oc.sampler_census("DiT-XL/2", history_layers=6, batch=2, cfg_scale=1.5),
    "train": oc.train_census("DiT-XL/2", history_layers=6, batch=2),
    "teacher": oc.teacher_census("DiT-XL/2", steps=25, cfg_scale=1.5),
    "published": oc.sampler_census("DiT-XL/2", history_layers=6, model_cls=PublishedARD),
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def xl_cuda(cuda_torch_tree):
    """The censuses of DiT-XL/2 (bf16, fake CUDA tensors) under the GPU stack, extension loaded."""
    # ard_kernels from the tree (its extension built for that torch), benchmarks/ from the checkout
    path = os.pathsep.join([str(cuda_torch_tree), str(ROOT)])
    proc = subprocess.run([gpu_stack_python(), "-c", _CENSUSES], cwd=cuda_torch_tree,
                          env=gpu_stack_env(PYTHONPATH=path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _steps(result):
    return [result["phases"][f"step {k}"] for k in range(K)]


@pytest.mark.slow
def test_cached_step_launch_plan(xl_cuda):
    """Each cached step of DiT-XL/2: one qkv-append per history layer (k and v into the cache, q read in place
    by the attention, nothing else copied), one fused attention per layer, two fused residual+LayerNorms per
    layer plus the first LayerNorm, four GEMMs per layer plus the patch embedding, the head's modulation and its
    Linear."""
    ard = xl_cuda["ard"]
    assert ard["cache_backend"] == "cuda"
    for k, step in enumerate(_steps(ard)):
        ops, kinds = step["ops"], step["by_kind"]
        assert kinds["kv_cache"] == N and ops["ard_kernels.qkv_append.default"] == N, (k, ops)
        assert "ard_kernels.qkv_split_append.default" not in ops, (k, ops)
        assert kinds["attention"] == DEPTH, (k, ops)
        assert ops["ard_kernels.block_attention_fwd.default"] == N  # the history layers: cached keys
        assert ops["ard_kernels.block_attention_qkv_fwd.default"] == DEPTH - N  # the others: packed, in-block
        assert kinds["norm"] == 2 * DEPTH + 1, (k, ops)
        assert ops["ard_kernels.gated_residual_modulated_layer_norm_inplace.default"] == 2 * DEPTH
        assert kinds["gemm"] == 4 * DEPTH + 3, (k, ops)
        assert ops["aten._addmm_activation.default"] == DEPTH  # fc1 + GELU: one GEMM in inference
        assert "aten.cat.default" not in ops
        assert kinds["copy"] == (2 if k == K - 1 else 1), (k, ops)  # unpatchify; the last step stacks too
        assert step["launches"] <= 8 * DEPTH, (k, step["launches"])


@pytest.mark.slow
def test_history_adds_one_launch_per_history_layer_per_step(xl_cuda):
    """ARD (N = 6) over step distillation (N = 0), same stack: exactly N more launches per step (the
    split-append; the cached attention replaces the packed one), and the same prelude but for the cache."""
    ard, sd = xl_cuda["ard"], xl_cuda["step_distilled"]
    assert [a - b for a, b in zip(ard["per_step_launches"], sd["per_step_launches"])] == [N] * K
    assert sd["cache_backend"] is None


@pytest.mark.slow
def test_prelude_shares_one_silu_among_the_adaln_linears(xl_cuda):
    """Before step 0: every layer's adaLN Linear once on the K block rows (not once per step), all fed by one
    SiLU(c) (plus the timestep MLP's own SiLU), and the two timestep-MLP GEMMs."""
    prelude = xl_cuda["ard"]["phases"]["prelude"]
    assert prelude["ops"]["aten.silu.default"] == 2, prelude["ops"]
    assert prelude["by_kind"]["gemm"] == DEPTH + 2, prelude["ops"]
    assert all(step["ops"].get("aten.silu.default", 0) == 0 for step in _steps(xl_cuda["ard"]))


@pytest.mark.slow
def test_the_extension_saves_the_torch_caches_copies(xl_cuda):
    """The PyTorch cache path does the split-append as copies (q made contiguous, k and v sliced in)."""
    torch_cache, ard = xl_cuda["ard_torch_cache"], xl_cuda["ard"]
    assert torch_cache["cache_backend"] == "torch"
    for step, fused in zip(_steps(torch_cache), _steps(ard)):
        assert step["by_kind"].get("kv_cache", 0) == 0
        assert step["by_kind"]["copy"] - fused["by_kind"]["copy"] >= 2 * N, step["ops"]
        assert step["launches"] > fused["launches"]


@pytest.mark.slow
def test_guidance_changes_only_the_guidance(xl_cuda):
    """Classifier-free guidance doubles the batch inside the same launches; per step it adds only the
    guidance on the head's output: four launches."""
    cfg, ard = xl_cuda["ard_cfg"], xl_cuda["ard"]
    for step, plain in zip(_steps(cfg), _steps(ard)):
        for kind in ("attention", "gemm", "kv_cache", "norm"):
            assert step["by_kind"][kind] == plain["by_kind"][kind], (kind, step["ops"])
        # ε_u, ε_c to fp32, one lerp, one broadcast copy into both halves
        assert step["launches"] - plain["launches"] == 4, (step["ops"], plain["ops"])


@pytest.mark.slow
def test_training_forward_launch_plan(xl_cuda):
    """ARDiT.forward_train (autograd on): every attention one packed Triton op over all K blocks (no copies
    of q, k, v or O), every LayerNorm one fused op, the adaLN Linears once each on the B·K block rows from
    one SiLU, the K heads' Linears one batched GEMM (no copies of h's slices)."""
    ops = xl_cuda["train"]["phases"]["forward_train"]["ops"]
    assert ops["ard_kernels.block_attention_qkv_fwd.default"] == DEPTH, ops
    assert ops["ard_kernels.gated_residual_modulated_layer_norm_fwd.default"] == 2 * DEPTH
    assert ops["ard_kernels.modulated_layer_norm_fwd.default"] == 1
    assert ops["aten.silu.default"] == 2
    assert ops["aten.baddbmm.default"] == 1 and "aten.mm.default" not in ops  # the K heads: one batched GEMM
    assert not any(name.startswith("ard_kernels.") and "inplace" in name for name in ops)  # autograd needs out-of-place


@pytest.mark.slow
def test_teacher_ddim_step_launch_plan(xl_cuda):
    """Each of the teacher's 25 guided DDIM steps: the trunk as in a student step (one fused attention per
    layer, two fused LayerNorms per layer plus the first), and all 28 adaLN Linears again (its timestep
    changes every step) fed by one SiLU: 5 GEMMs per layer plus the patch embedding, the timestep MLP's two
    and the final layer's two."""
    teacher = xl_cuda["teacher"]
    assert len(teacher["per_step_launches"]) == 25
    for k in range(25):
        step = teacher["phases"][f"step {k}"]
        kinds, ops = step["by_kind"], step["ops"]
        assert kinds["attention"] == DEPTH and kinds["norm"] == 2 * DEPTH + 1, (k, ops)
        assert kinds["gemm"] == 5 * DEPTH + 5, (k, ops)
        assert ops["aten.silu.default"] == 2, (k, ops)


@pytest.mark.slow
def test_the_published_formulation_launches_three_times_as_much(xl_cuda):
    """The published code's formulation (benchmarks/published_ard.py: per-token adaLN recomputed at every
    step, unfused LayerNorm and modulation, float-mask SDPA, torch.cat cache), its SDPA counted as one
    fused kernel: over 3× the launches of a cached step here, with the same 28 attentions."""
    published, ard = xl_cuda["published"], xl_cuda["ard"]
    assert published["config"]["class"] == "PublishedARD"
    for step, ours in zip(_steps(published), _steps(ard)):
        assert step["by_kind"]["attention"] == DEPTH, step["ops"]
        assert step["launches"] >= 3 * ours["launches"], (step["launches"], ours["launches"])
