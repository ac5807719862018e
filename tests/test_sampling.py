"""The KV-cached K-step sampler equals the training forward on its own states.

The property that ties the package together: step k of :func:`ard_kernels.sampling.sample` (block
k's tokens only, history from the cache) computes what :meth:`ARDiT.forward_train` computes for
block k when fed ``[x_T, s_1, …, s_{K−1}]``, for every pattern and history depth. CPU, tiny
config, reference backends, random weights; the CUDA paths (kernels, CUDA graphs) under ``cuda``.

The CUDA-graph sampler's logic runs on the CPU too: :class:`EagerReplay` replaces
``ard_kernels.graphs.GraphRunner`` (the capture/replay seam) and re-runs the captured function at every
replay, and the ``meta`` device stands in for the GPU to prove capture does no host↔device traffic.
"""


import pytest
import torch
from _graph_helpers import HostWork, HostWorkGuard, install_eager_replay
from _model_helpers import randomize
from torch.utils._python_dispatch import TorchDispatchMode

from ard_kernels import sampling
from ard_kernels.models import ARDiT, DiT

TINY = dict(input_size=8, num_classes=10)
REF = dict(attn_backend="reference", mod_backend="reference", cache_backend="torch")
PATTERNS = ["causal", "diagonal", "window", "first", "table"]
DEPTH = 4


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


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_the_sampler_never_reads_unwritten_cache_storage(backend, monkeypatch):
    """The sampler leaves its cache storage unfilled (a fill is a pass over the whole cache at every call).
    Filled with NaN instead, the outputs are bitwise the same: no step reads past what the steps appended."""
    from ard_kernels import kv_cache

    student = make_student("causal", 2).set_backends(attn=backend, mod=backend)
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    assert sampling.make_cache(student, 2, torch.float32, noise.device).fill is None
    with torch.no_grad():
        want = sampling.sample_outputs(student, noise, y)
        made, cache_class = [], kv_cache.HistoryKVCache

        def nan_filled(*args, **kwargs):
            cache = cache_class(*args, **{**kwargs, "fill": float("nan")})
            made.append(bool(cache.k.isnan().all() and cache.v.isnan().all()))
            return cache

        monkeypatch.setattr(kv_cache, "HistoryKVCache", nan_filled)
        got = sampling.sample_outputs(student, noise, y)
    assert made == [True]  # the sampler's one cache started all NaN
    torch.testing.assert_close(got, want, rtol=0, atol=0)


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
    # conftest sets TRITON_INTERPRET=1 on CPU-only machines, so Triton always runs here: a skip would hide a failure
    assert "triton" in available_backends(device), f"Triton cannot run on {device} (TRITON_INTERPRET=1 is unset?)"
    student = make_student("causal", 2).to(device).set_backends(attn="triton", mod="triton")
    noise, y = torch.randn(1, 4, 8, 8, device=device), torch.tensor([3], device=device)
    with torch.no_grad():
        outputs = sampling.sample_outputs(student, noise, y)
        torch.testing.assert_close(teacher_forcing(student, noise, outputs, y), outputs, rtol=1e-4, atol=1e-4)
        student.set_backends(attn="reference", mod="reference")
        torch.testing.assert_close(sampling.sample_outputs(student, noise, y), outputs, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- CUDA-graph runner, on the CPU
aten = torch.ops.aten


@pytest.fixture
def graph_runner(monkeypatch):
    return install_eager_replay(monkeypatch)


GRAPHABLE = dict(attn_backend="sdpa")  # capture-safe on contiguous patterns; the reference backend is not


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("history_layers", [0, 1, DEPTH])
def test_graph_runner_equals_eager_over_two_calls(graph_runner, history_layers, guided):
    """Two calls with new noise, labels and scale: stale static buffers or a missing cache reset would differ."""
    student = make_student("causal", history_layers, **GRAPHABLE)
    calls = [(torch.randn(2, 4, 8, 8), torch.tensor([3, 7]), 2.5 if guided else 1.0),
             (torch.randn(2, 4, 8, 8), torch.tensor([1, 10]), 4.0 if guided else 1.0)]
    results = []
    for noise, y, s in calls:
        graphed = sampling.sample_outputs(student, noise, y, cfg_scale=s, use_cuda_graphs=True)
        torch.testing.assert_close(graphed, sampling.sample_outputs(student, noise, y, cfg_scale=s), rtol=0, atol=0)
        results.append((graphed, graphed.clone()))
    torch.testing.assert_close(results[0][0], results[0][1], rtol=0, atol=0)  # a copy, not the static outputs
    assert (results[0][0] - results[1][0]).abs().max() > 1e-3
    assert graph_runner.captures == 1 and len(student._graph_samplers) == 1


def test_graph_runner_captures_again_when_programmatic_launch_changes(graph_runner):
    """A captured graph holds its launches as they were made: with PDL switched on (ard_kernels.ops._pdl) the
    sampler captures a graph of its own, and switching back replays the first one."""
    from ard_kernels.ops import programmatic_launch

    student = make_student("causal", 1, **GRAPHABLE)
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    plain = sampling.sample_outputs(student, noise, y, use_cuda_graphs=True)
    with programmatic_launch(True):
        pdl = sampling.sample_outputs(student, noise, y, use_cuda_graphs=True)
    again = sampling.sample_outputs(student, noise, y, use_cuda_graphs=True)
    assert graph_runner.captures == 2 and len(student._graph_samplers) == 2
    torch.testing.assert_close(pdl, plain, rtol=0, atol=0)  # never PDL on the CPU: the same kernels
    torch.testing.assert_close(again, plain, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["causal", "window", "first", "table"])
@pytest.mark.parametrize("history_layers", [0, 1, DEPTH])
def test_recomputing_the_history_gives_the_cached_samples(pattern, history_layers):
    """Without the cache, every step rebuilds blocks 0..k−1's keys and values: the same outputs, more work."""
    student = make_student(pattern, history_layers)
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    cached = sampling.sample_outputs(student, noise, y)
    recomputed = sampling.sample_recomputing_history(student, noise, y)
    torch.testing.assert_close(recomputed, cached, rtol=1e-5, atol=1e-5)
    assert cached[:, -1].abs().max() > 0.1


def test_graph_capture_under_autocast_caches_no_weight_casts(graph_runner, monkeypatch):
    """Under autocast the warm-up and capture run with autocast's weight-cast cache off: a graph reading
    cached casts would read freed memory once the caller's autocast block ends. Same samples either way."""
    seen = []
    capture = graph_runner.capture

    def recording_capture(self, fn):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled()))
        return capture(self, fn)

    monkeypatch.setattr(graph_runner, "capture", recording_capture)
    student = make_student("causal", 2, **GRAPHABLE)
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    for _ in range(2):  # the second call replays, in a new autocast block
        with torch.autocast("cpu", dtype=torch.bfloat16):
            graphed = student.sample(noise, y, use_cuda_graphs=True)
            eager = student.sample(noise, y)
        torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    assert seen == [(True, False)] and torch.is_autocast_cache_enabled()  # one capture; the flag restored


def test_graph_runner_states_and_guidance_share_nothing(graph_runner):
    """Guided and unguided calls of one batch size are two graphs; each keeps its own static buffers."""
    student = make_student("window", 2, **GRAPHABLE)
    noise, y = torch.randn(1, 4, 8, 8), torch.tensor([5])
    plain = student.sample(noise, y, use_cuda_graphs=True)
    guided = student.sample(noise, y, cfg_scale=3.0, use_cuda_graphs=True)
    torch.testing.assert_close(student.sample(noise, y, use_cuda_graphs=True), plain, rtol=0, atol=0)
    torch.testing.assert_close(guided, student.sample(noise, y, cfg_scale=3.0), rtol=0, atol=0)
    assert graph_runner.captures == 2


def test_graph_runner_call_takes_no_allocation_path(graph_runner):
    """After the capture a call only writes the static inputs and replays: no op outside the graph allocates."""
    student = make_student("causal", 2, **GRAPHABLE)
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    sampling.sample_outputs(student, noise, y, cfg_scale=2.0, use_cuda_graphs=True)
    (sampler,) = student._graph_samplers.values()
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not graph_runner.replaying:
                seen.append(func)
            return func(*args, **(kwargs or {}))

    noise2, y2 = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad(), Record():
        outs = sampler.run(noise2, y2, 3.0)
    assert set(seen) <= {aten.copy_.default, aten.fill_.Scalar}, seen
    assert len(outs) == student.steps and graph_runner.captures == 1


def test_graph_runner_under_inference_mode_and_no_grad(graph_runner):
    """Static buffers and the cache are normal tensors: calls may alternate inference_mode and no_grad."""
    student = make_student("causal", 2, **GRAPHABLE)
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    expected = sampling.sample_outputs(student, noise, y, cfg_scale=2.0)
    with torch.inference_mode():
        first = student.sample(noise, y, cfg_scale=2.0, return_states=True, use_cuda_graphs=True)[1]
    second = student.sample(noise, y, cfg_scale=2.0, return_states=True, use_cuda_graphs=True)[1]
    with torch.inference_mode():
        third = student.sample(noise, y, cfg_scale=2.0, return_states=True, use_cuda_graphs=True)[1]
    for states in (first, second, third):
        torch.testing.assert_close(states, expected[:, :, :4], rtol=0, atol=0)


def test_graph_runner_follows_weight_updates(graph_runner):
    """In-place updates are read by the graph as is; .to() and load_state_dict(assign=True) drop the graphs."""
    student = make_student("causal", 2, **GRAPHABLE)
    noise, y = torch.randn(1, 4, 8, 8), torch.tensor([4])
    sampling.sample_outputs(student, noise, y, use_cuda_graphs=True)
    with torch.no_grad():
        student.blocks[0].attn.qkv.weight.mul_(1.5)
    torch.testing.assert_close(sampling.sample_outputs(student, noise, y, use_cuda_graphs=True),
                               sampling.sample_outputs(student, noise, y), rtol=0, atol=0)
    assert graph_runner.captures == 1
    sd = {k: v * 0.5 for k, v in student.state_dict().items()}
    student.load_state_dict(sd, assign=True)
    assert not student._graph_samplers
    torch.testing.assert_close(sampling.sample_outputs(student, noise, y, use_cuda_graphs=True),
                               sampling.sample_outputs(student, noise, y), rtol=0, atol=0)
    assert graph_runner.captures == 2
    student.to(torch.float32)  # even a no-op .to() goes through _apply
    assert not student._graph_samplers
    sampling.sample_outputs(student, noise, y, use_cuda_graphs=True)
    sampling.clear_cuda_graphs(student)
    assert not student._graph_samplers


NOT_CAPTURABLE = [("reference", "causal"), ("sdpa", "first"), ("sdpa", "table"), ("auto", "first")]


@pytest.mark.parametrize("attn,pattern", NOT_CAPTURABLE)
def test_graph_mode_refuses_backends_that_build_masks_on_the_host(graph_runner, attn, pattern):
    student = make_student(pattern, 2, attn_backend=attn)
    with pytest.raises(ValueError, match="attn_backend.*CUDA graph"):
        student.sample(torch.randn(1, 4, 8, 8), torch.tensor([1]), use_cuda_graphs=True)
    assert graph_runner.captures == 0


@pytest.mark.parametrize("attn,pattern", NOT_CAPTURABLE)
def test_refused_backends_do_copy_host_masks_to_the_device(attn, pattern):
    """The refusal is not over-cautious: on a device (meta) those backends copy a host-built mask per call."""
    student = make_student(pattern, 2, attn_backend=attn).to("meta")
    noise, y = torch.randn(1, 4, 8, 8, device="meta"), torch.ones(1, dtype=torch.long, device="meta")
    with pytest.raises(HostWork, match="copies host data"), HostWorkGuard():
        sampling.sample_outputs(student, noise, y)


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("history_layers,pattern", [(0, "causal"), (2, "causal"), (2, "window"), (DEPTH, "diagonal")])
def test_accepted_backends_capture_without_host_work(graph_runner, history_layers, pattern, guided):
    """With a device (meta) standing in for the GPU, warm-up aside, capture and replays touch no host data."""
    student = make_student(pattern, history_layers, attn_backend="auto").to("meta")
    noise, y = torch.randn(2, 4, 8, 8, device="meta"), torch.ones(2, dtype=torch.long, device="meta")
    for _ in range(2):
        out = sampling.sample_outputs(student, noise, y, cfg_scale=2.0 if guided else 1.0, use_cuda_graphs=True)
    assert out.shape == (2, 4, 8, 8, 8) and out.device.type == "meta" and graph_runner.captures == 1


def test_check_capturable_names_the_choice():
    sampling.check_capturable(make_student("first", 0, attn_backend="sdpa"), "cpu")  # no history: no mask
    sampling.check_capturable(make_student("first", 2, attn_backend="flex"), "cpu")
    with pytest.raises(ValueError, match=r"steps \[2, 3\]"):
        sampling.check_capturable(make_student("first", 2, attn_backend="sdpa"), "cpu")


# ------------------------------------------------------------------------------------------------ GPU
FAST = dict(attn_backend="auto", mod_backend="auto", cache_backend="auto")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.cuda
def test_cuda_graphs_under_autocast_cast_the_current_weights():
    """A graph captured under autocast casts the weights at every replay, so it sees an in-place update made
    after the capture, in a later autocast block. Had it read the casts autocast cached during the warm-up
    (freed when that block ended), it would replay the old weights, or freed memory."""
    student = make_student("causal", 2, **FAST).cuda()
    noise, y = torch.randn(2, 4, 8, 8, device="cuda"), torch.tensor([3, 7], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        before = sampling.sample_outputs(student, noise, y, use_cuda_graphs=True)  # captured here
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.8)  # in place: the graph reads these addresses
    with torch.autocast("cuda", dtype=torch.bfloat16):
        graphed = sampling.sample_outputs(student, noise, y, use_cuda_graphs=True)
        eager = sampling.sample_outputs(student, noise, y)
    assert rel_err(graphed, eager) < 1e-2
    assert rel_err(before, eager) > 5e-2  # the update did change the samples


@pytest.mark.cuda
@pytest.mark.parametrize("pattern", ["causal", "window", "first"])
@pytest.mark.parametrize("guided", [False, True])
def test_cuda_graph_sampler_equals_eager(pattern, guided, cuda_extension):
    """Graph replay = eager run of the same kernels (fast backends: the reference builds masks on the
    host per call, which a capture cannot contain), the history in the extension's cache."""
    student = make_student(pattern, 2, **FAST).cuda()
    assert sampling.make_cache(student, 2, torch.float32, torch.device("cuda")).backend == "cuda"
    noise, y = torch.randn(2, 4, 8, 8, device="cuda"), torch.tensor([3, 7], device="cuda")
    s, s2 = (2.5, 3.5) if guided else (1.0, 1.0)  # unguided stays unguided: guidance on is another graph
    eager = sampling.sample_outputs(student, noise, y, cfg_scale=s)
    graphed = sampling.sample_outputs(student, noise, y, cfg_scale=s, use_cuda_graphs=True)
    assert rel_err(graphed, eager) < 1e-5
    # Replays with new inputs (no recapture) follow them.
    noise2, y2 = torch.randn_like(noise), torch.tensor([1, 2], device="cuda")
    again = sampling.sample_outputs(student, noise2, y2, cfg_scale=s2, use_cuda_graphs=True)
    assert rel_err(again, sampling.sample_outputs(student, noise2, y2, cfg_scale=s2)) < 1e-5
    assert len(student._graph_samplers) == 1


@pytest.mark.cuda
def test_cuda_graph_sampler_with_programmatic_launch(cuda_extension):
    """bf16 sampling with PDL (Hopper): the graph replays what the same launches give eagerly, the Linears run
    the Triton plans (timed among themselves), and the samples match the plainly launched ones up to the
    plans' rounding."""
    from ard_kernels.ops import linear as lin
    from ard_kernels.ops import programmatic_launch

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or later")
    student = make_student("causal", 2, **FAST).cuda().to(torch.bfloat16)
    noise = torch.randn(2, 4, 8, 8, device="cuda", dtype=torch.bfloat16)
    y = torch.tensor([3, 7], device="cuda")
    plain = sampling.sample_outputs(student, noise, y, use_cuda_graphs=True)
    with programmatic_launch(True):
        eager = sampling.sample_outputs(student, noise, y)
        graphed = sampling.sample_outputs(student, noise, y, use_cuda_graphs=True)
        noise2 = torch.randn_like(noise)
        again = sampling.sample_outputs(student, noise2, y, use_cuda_graphs=True)
        eager2 = sampling.sample_outputs(student, noise2, y)
    # (a race, a kernel reading its input before the previous one wrote it, would be far off, not rounding)
    assert rel_err(graphed, eager) < 1e-2 and rel_err(again, eager2) < 1e-2
    assert rel_err(graphed, plain) < 2e-2
    assert len(student._graph_samplers) == 2
    pdl_plans = {k: v for k, v in lin.chosen_plans().items() if k.endswith("(pdl)")}
    assert pdl_plans and "cublas" not in pdl_plans.values(), pdl_plans


@pytest.mark.cuda
@pytest.mark.parametrize("pattern", ["causal", "first"])
def test_cuda_kernels_sampler_matches_training_forward_bf16(pattern, cuda_extension):
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


@pytest.mark.cuda
@pytest.mark.parametrize("history_layers,cache_backend",
                         [(0, "auto"), (1, "auto"), (1, "torch"), (DEPTH, "auto"), (DEPTH, "torch")])
def test_cuda_graphs_equal_eager_for_every_history_depth(history_layers, cache_backend):
    """Graphs vs eager over two guided calls, the first under inference_mode; a graphed call allocates
    only its result (the stack of the K outputs), however many steps and layers it runs."""
    student = make_student("causal", history_layers, **{**FAST, "cache_backend": cache_backend}).cuda()
    calls = [(torch.randn(2, 4, 8, 8, device="cuda"), torch.tensor([3, 7], device="cuda"), 2.5),
             (torch.randn(2, 4, 8, 8, device="cuda"), torch.tensor([1, 10], device="cuda"), 4.0)]
    with torch.inference_mode():
        first = sampling.sample_outputs(student, *calls[0][:2], cfg_scale=calls[0][2], use_cuda_graphs=True)
    assert rel_err(first, sampling.sample_outputs(student, *calls[0][:2], cfg_scale=calls[0][2])) < 1e-5
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    second = sampling.sample_outputs(student, *calls[1][:2], cfg_scale=calls[1][2], use_cuda_graphs=True)
    allocations = torch.cuda.memory_stats()["allocation.all.allocated"] - before
    assert allocations <= 1, allocations
    assert rel_err(second, sampling.sample_outputs(student, *calls[1][:2], cfg_scale=calls[1][2])) < 1e-5
    assert rel_err(first, second) > 1e-2  # the static buffers did take the new inputs


@pytest.mark.cuda
def test_cuda_graphs_refuse_the_reference_attention():
    student = make_student("causal", 2, **{**FAST, "attn_backend": "reference"}).cuda()
    with pytest.raises(ValueError, match="attn_backend"):
        student.sample(torch.randn(1, 4, 8, 8, device="cuda"), torch.tensor([1], device="cuda"), use_cuda_graphs=True)
