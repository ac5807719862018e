"""DDIM teacher sampler: DiT's schedule, respacing, the eta-0 update, guidance, recording."""

import math

import pytest
import torch

from ard_kernels.diffusion import DDIMSampler, alphas_cumprod, guided_eps, linear_betas, respaced_timesteps


def test_linear_betas_is_dit_schedule():
    b = linear_betas()
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    assert b[500].item() == pytest.approx(1e-4 + (0.02 - 1e-4) * 500 / 999)
    acp = alphas_cumprod(b)
    assert acp[-1].item() == pytest.approx(math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000)))
    assert 4.0e-5 < acp[-1].item() < 4.1e-5  # DiT's x_T is almost pure noise


@pytest.mark.parametrize("steps", [1, 4, 25, 50, 250, 1000])
def test_ddim_spacing_is_evenly_strided(steps):
    ts = respaced_timesteps(1000, steps, "ddim")
    assert len(ts) == steps and ts[0] == 0
    assert len(set(torch.diff(ts).tolist())) <= 1  # one integer stride


def test_ddim25_and_uniform25():
    assert respaced_timesteps(1000, 25, "ddim").tolist() == list(range(0, 1000, 40))
    u = respaced_timesteps(1000, 25, "uniform").tolist()
    assert len(u) == 25 and u[0] == 0 and u[-1] == 999 and u[1] == 42
    assert all(b > a for a, b in zip(u, u[1:]))


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=1001), dict(spacing="linear")])
def test_respacing_errors(bad):
    kw = dict(steps=25, spacing="ddim") | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        respaced_timesteps(1000, **kw)


class DiracOracle(torch.nn.Module):
    """The exact ε-predictor for data concentrated on one point x0: ε = (x_t − √ᾱ_t·x0)/√(1 − ᾱ_t).

    Outputs 2C channels (learn_sigma layout) with garbage in the variance half.
    """

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.acp = alphas_cumprod(linear_betas())
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], t.clone()))
        a = self.acp[t].float().view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.full_like(eps, 123.0)], dim=1)


@pytest.mark.parametrize("steps,spacing", [(25, "ddim"), (25, "uniform"), (7, "ddim")])
@pytest.mark.parametrize("record", ["x0", "xt"])
def test_ddim_recovers_dirac_data(steps, spacing, record):
    x0 = torch.randn(1, 4, 6, 6)
    model = DiracOracle(x0)
    sampler = DDIMSampler(steps, spacing)
    noise = torch.randn(3, 4, 6, 6)
    idx = [steps - 2, steps // 2, 0]
    final, rec = sampler.sample(model, noise, torch.zeros(3, dtype=torch.int64), cfg_scale=1.0,
                                record_indices=idx, record=record)
    assert rec.shape == (3, 3, 4, 6, 6) and final.dtype == torch.float32
    torch.testing.assert_close(final, x0.expand(3, -1, -1, -1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rec[:, -1], final)  # index 0 is the final sample for both kinds
    if record == "x0":
        torch.testing.assert_close(rec, x0.unsqueeze(1).expand(3, 3, -1, -1, -1), atol=1e-4, rtol=1e-4)
    else:  # x_t after step i sits on the DDIM line between x_T and x0
        t_prev = sampler.timesteps[idx[0] - 1]
        a = model.acp[t_prev].float()
        eps_T = (noise - model.acp[sampler.timesteps[-1]].float().sqrt() * x0) / (
            1 - model.acp[sampler.timesteps[-1]].float()).sqrt()
        torch.testing.assert_close(rec[:, 0], a.sqrt() * x0 + (1 - a).sqrt() * eps_T, atol=1e-4, rtol=1e-4)
    # the model saw the original timesteps, largest first, one call per step, no batch doubling at s = 1
    assert [int(t[0]) for _, t in model.calls] == sampler.timesteps.flip(0).tolist()
    assert all(b == 3 for b, _ in model.calls)


def test_ddim_step_matches_dit_formulas():
    """DiT's ddim_sample: x̂0 from ε, ε re-derived from x̂0, mean = x̂0·√ᾱ_prev + √(1 − ᾱ_prev)·ε."""
    s = DDIMSampler(25)
    x, eps = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, 4, dtype=torch.float64)
    i = 13
    a, ap = s.alphas_cumprod[i], s.alphas_cumprod_prev[i]
    x0 = (1 / a).sqrt() * x - (1 / a - 1).sqrt() * eps
    eps2 = ((1 / a).sqrt() * x - x0) / (1 / a - 1).sqrt()
    want = x0 * ap.sqrt() + (1 - ap).sqrt() * eps2
    got, got_x0 = s.step(x, eps, i)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_x0, x0.float(), atol=1e-5, rtol=1e-5)
    assert s.alphas_cumprod_prev[0] == 1.0


class Linear(torch.nn.Module):
    """ε depends on the label so guidance is visible; optional DiT-style forward_with_cfg."""

    num_classes = 10

    def forward(self, x, t, y):
        return torch.cat([x * 0.5 + y.view(-1, 1, 1, 1).float(), x], dim=1)


class WithCfg(Linear):
    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        combined = torch.cat([half, half])
        out = self.forward(combined, t, y)
        c = x.shape[1]
        cond, uncond = out[: len(x) // 2, :c], out[len(x) // 2:, :c]
        g = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([g, g]), out[:, c:]], dim=1)


@pytest.mark.parametrize("cls", [Linear, WithCfg])
def test_guidance_uses_null_class(cls):
    x, t, y = torch.randn(2, 4, 3, 3), torch.tensor([5, 5]), torch.tensor([2, 7])
    got = guided_eps(cls(), x, t, y, 1.5)
    want = x * 0.5 + 10 + 1.5 * (y.view(-1, 1, 1, 1).float() - 10)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(guided_eps(cls(), x, t, y, 1.0), x * 0.5 + y.view(-1, 1, 1, 1).float())


def test_guidance_needs_num_classes():
    model = lambda x, t, y: x  # noqa: E731
    with pytest.raises(ValueError, match="num_classes"):
        guided_eps(model, torch.randn(1, 4, 2, 2), torch.tensor([1]), torch.tensor([0]), 1.5)


@pytest.mark.parametrize("idx", [[], [25], [5, 10], [3, 3], [-1]])
def test_record_index_errors(idx):
    with pytest.raises(ValueError, match="record_indices"):
        DDIMSampler(25).check_indices(idx)


def test_sample_input_errors():
    s = DDIMSampler(4)
    with pytest.raises(ValueError, match="record"):
        s.sample(Linear(), torch.randn(1, 4, 2, 2), torch.zeros(1, dtype=torch.int64), record="eps",
                 record_indices=[0])
    with pytest.raises(ValueError, match="y"):
        s.sample(Linear(), torch.randn(2, 4, 2, 2), torch.zeros(1, dtype=torch.int64), record_indices=[0])
