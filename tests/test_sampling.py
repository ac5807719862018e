"""The KV-cached K-step sampler equals the training forward on its own states.

The property that ties the package together: step k of :func:`ard_kernels.sampling.sample` (block
k's tokens only, history from the cache) computes what :meth:`ARDiT.forward_train` computes for
block k when fed ``[x_T, s_1, …, s_{K−1}]``, for every pattern and history depth. CPU, tiny
config, reference backends, random weights; the CUDA paths (kernels, CUDA graphs) under ``cuda``.
"""

import pytest
import torch

from ard_kernels import sampling
from ard_kernels.models import ARDiT, DiT

TINY = dict(input_size=8, num_classes=10)
REF = dict(attn_backend="reference", mod_backend="reference", cache_backend="torch")
PATTERNS = ["causal", "diagonal", "window", "first", "table"]
DEPTH = 4


def randomize(model, std=0.15):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0.0, std)
    return model.eval()


def make_student(pattern="causal", history_layers=2, steps=4, **kw):
    if pattern == "table":  # a custom table: itself, block 0 and two blocks back
        i, j = torch.arange(steps)[:, None], torch.arange(steps)[None]
        pattern = (j == i) | (j == 0) | (j == i - 2)
    return randomize(ARDiT("DiT-tiny/2", history_layers=history_layers, steps=steps, pattern=pattern,
                           **{**TINY, **REF, **kw}))


def teacher_forcing(student, noise, outputs, y):
    """forward_train on the sampler's own states: [noise, s_1, …, s_{K−1}]."""
    c = student.in_channels
    states = torch.cat([noise[:, None], outputs[:, :-1, :c]], dim=1)
    return student.forward_train(states, y)


@pytest.mark.parametrize("history_layers", [0, 1, DEPTH])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cached_sampling_equals_the_training_forward(pattern, history_layers):
    student = make_student(pattern, history_layers)
    noise = torch.randn(2, 4, 8, 8)
    y = torch.tensor([3, 7])
    with torch.no_grad():
        outputs = sampling.sample_outputs(student, noise, y)
        assert outputs.shape == (2, 4, 8, 8, 8)
        torch.testing.assert_close(teacher_forcing(student, noise, outputs, y), outputs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 3])
def test_cached_sampling_other_step_counts(steps):
    student = make_student("causal", 2, steps=steps)
    noise, y = torch.randn(1, 4, 8, 8), torch.tensor([4])
    with torch.no_grad():
        outputs = sampling.sample_outputs(student, noise, y)
        torch.testing.assert_close(teacher_forcing(student, noise, outputs, y), outputs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", ["causal", "first"])
def test_cached_sampling_with_guidance_equals_the_guided_training_forward(pattern):
    """With CFG both halves carry the guided state, so forward_train on the doubled batch + guidance agrees."""
    student = make_student(pattern, 2)
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    s = 3.0
    with torch.no_grad():
        outputs = sampling.sample_outputs(student, noise, y, cfg_scale=s)
        states = torch.cat([noise[:, None], outputs[:, :-1, :4]], dim=1)
        raw = student.forward_train(torch.cat([states, states]), torch.cat([y, torch.full_like(y, 10)]))
        cond, uncond = raw.chunk(2)
        expected = torch.cat([uncond[:, :, :4] + s * (cond[:, :, :4] - uncond[:, :, :4]), cond[:, :, 4:]], dim=2)
        # Guidance amplifies fp32 rounding by up to 2s − 1 = 5: hence 5× the unguided tolerance.
        torch.testing.assert_close(outputs, expected, rtol=5e-5, atol=5e-5)


def test_without_history_each_step_is_the_teacher():
    """N = 0: step k equals DiT.forward at t_k (teacher with the trunk's weights and head k)."""
    student = make_student("causal", 0)
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 10])
    with torch.no_grad():
        outputs = sampling.sample_outputs(student, noise, y)
        times = student.block_times()
        x = noise
        for k, head in enumerate(student.heads):
            teacher = DiT("DiT-tiny/2", attn_backend="reference", mod_backend="reference", **TINY).eval()
            sd = {n: v for n, v in student.state_dict().items() if not n.startswith("final_layer")}
            sd.update({f"final_layer.{n}": v for n, v in head.state_dict().items()})
            teacher.load_state_dict(sd, strict=True)
            expected = teacher(x, times[k].expand(2), y)
            torch.testing.assert_close(outputs[:, k], expected, rtol=1e-5, atol=1e-5)
            x = expected[:, :4]


def test_sample_returns_final_and_states():
    student = make_student("causal", 2)
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    outputs = sampling.sample_outputs(student, noise, y)
    final, states = student.sample(noise, y, return_states=True)
    assert states.shape == (2, 4, 4, 8, 8)
    torch.testing.assert_close(states, outputs[:, :, :4], rtol=0, atol=0)
    torch.testing.assert_close(final, states[:, -1], rtol=0, atol=0)
    torch.testing.assert_close(student.sample(noise, y), final, rtol=0, atol=0)
    # cfg_scale 1 is the unguided sampler; the doubled batch gives the same numbers.
    guided_one = sampling.sample_outputs(student, noise, y, cfg_scale=1.0 + 1e-12)
    torch.testing.assert_close(guided_one, outputs, rtol=1e-5, atol=1e-5)


def test_sampling_uses_the_history_cache():
    """History changes the result (the test would pass vacuously if the cache were ignored)."""
    noise, y = torch.randn(1, 4, 8, 8), torch.tensor([2])
    causal = make_student("causal", 2)
    diag = make_student("diagonal", 2)
    diag.load_state_dict(causal.state_dict())
    a = sampling.sample_outputs(causal, noise, y)
    b = sampling.sample_outputs(diag, noise, y)
    torch.testing.assert_close(a[:, 0], b[:, 0], rtol=1e-6, atol=1e-6)  # step 0 has no history
    assert (a[:, 1:] - b[:, 1:]).abs().max() > 1e-3


def test_attention_plan_slices_contiguous_rows():
    student = make_student("window", 2)
    n = student.num_tokens
    assert student.attention_plan(0) == (0, n, n, "causal")
    assert student.attention_plan(3) == (2 * n, 4 * n, 2 * n, "causal")
    lo, hi, bs, pat = make_student("first", 2).attention_plan(3)
    assert (lo, hi, bs) == (0, 4 * n, n) and pat.tolist() == [
        [True, False, False, False], [True, True, False, False], [True, False, True, False],
        [True, False, False, True]]


def test_vae_decode_is_applied_to_the_final_latent():
    student = make_student("causal", 1)
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])

    class FakeVAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.seen = None

        def decode(self, z):
            self.seen = z
            return type("Out", (), {"sample": z[:, :3] * 2})()

    vae = FakeVAE()
    images, states = student.sample(noise, y, return_states=True, vae=vae)
    torch.testing.assert_close(vae.seen, states[:, -1] / 0.18215)
    torch.testing.assert_close(images, states[:, -1, :3] / 0.18215 * 2)


def test_invalid_sampling_inputs_are_named():
    student = make_student("causal", 2)
    with pytest.raises(ValueError, match="noise"):
        student.sample(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="y"):
        student.sample(torch.randn(2, 4, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="use_cuda_graphs"):
        student.sample(torch.randn(1, 4, 8, 8), torch.tensor([1]), use_cuda_graphs=True)
    no_null = make_student("causal", 2, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="cfg_scale"):
        no_null.sample(torch.randn(1, 4, 8, 8), torch.tensor([1]), cfg_scale=2.0)
    ahead = make_student(torch.ones(4, 4, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="pattern"):
        ahead.sample(torch.randn(1, 4, 8, 8), torch.tensor([1]))


def test_cached_sampling_equals_the_training_forward_with_triton_kernels():
    """The same property through the Triton kernels (interpreter on CPU: one small case, ~10 s)."""
    from ard_kernels import available_backends

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if "triton" not in available_backends(device):
        pytest.skip(f"Triton cannot run on {device} here (TRITON_INTERPRET=1 is needed on CPU)")
    student = make_student("causal", 2).to(device).set_backends(attn="triton", mod="triton")
    noise, y = torch.randn(1, 4, 8, 8, device=device), torch.tensor([3], device=device)
    with torch.no_grad():
        outputs = sampling.sample_outputs(student, noise, y)
        torch.testing.assert_close(teacher_forcing(student, noise, outputs, y), outputs, rtol=1e-4, atol=1e-4)
        student.set_backends(attn="reference", mod="reference")
        torch.testing.assert_close(sampling.sample_outputs(student, noise, y), outputs, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ GPU
FAST = dict(attn_backend="auto", mod_backend="auto", cache_backend="auto")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.cuda
@pytest.mark.parametrize("pattern", ["causal", "window", "first"])
@pytest.mark.parametrize("guided", [False, True])
def test_cuda_graph_sampler_equals_eager(pattern, guided):
    """Graph replay = eager run of the same kernels (fast backends: the reference builds masks on the
    host per call, which a capture cannot contain)."""
    student = make_student(pattern, 2, **FAST).cuda()
    noise, y = torch.randn(2, 4, 8, 8, device="cuda"), torch.tensor([3, 7], device="cuda")
    s = 2.5 if guided else 1.0
    eager = sampling.sample_outputs(student, noise, y, cfg_scale=s)
    graphed = sampling.sample_outputs(student, noise, y, cfg_scale=s, use_cuda_graphs=True)
    assert rel_err(graphed, eager) < 1e-5
    # Replays with new inputs (no recapture) follow them.
    noise2, y2 = torch.randn_like(noise), torch.tensor([1, 2], device="cuda")
    again = sampling.sample_outputs(student, noise2, y2, cfg_scale=s + 1, use_cuda_graphs=True)
    assert rel_err(again, sampling.sample_outputs(student, noise2, y2, cfg_scale=s + 1)) < 1e-5
    assert len(student._graph_samplers) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("pattern", ["causal", "first"])
def test_cuda_kernels_sampler_matches_training_forward_bf16(pattern):
    """The fast backends ("auto": Triton kernels, CUDA KV cache) in bf16: cached = training path."""
    student = make_student(pattern, 2, **FAST).cuda().to(torch.bfloat16)
    noise = torch.randn(2, 4, 8, 8, device="cuda", dtype=torch.bfloat16)
    y = torch.tensor([3, 7], device="cuda")
    with torch.no_grad():
        outputs = sampling.sample_outputs(student, noise, y)
        graphed = sampling.sample_outputs(student, noise, y, use_cuda_graphs=True)
        train = teacher_forcing(student, noise, outputs, y)
        student.set_backends(attn="reference", mod="reference", cache="torch")
        reference = teacher_forcing(student.float(), noise.float(), outputs.float(), y)
    assert rel_err(graphed, outputs) < 1e-2
    assert rel_err(train, outputs) < 3e-2
    assert rel_err(outputs, reference) < 3e-2
