"""DiT teacher and ARDiT student: checkpoint layout, DiT semantics, the training forward.

Tiny configs (DiT-tiny/2 on 8×8 latents: 16 tokens per block) with the reference backends, and
weights re-drawn at random (DiT's own init zeroes adaLN and the heads, which would make most
equalities trivial).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from _model_helpers import randomize

from ard_kernels.models import CONFIGS, ARDiT, DiT, DiTConfig, get_config, infer_dit_kwargs, sincos_pos_embed_2d
from ard_kernels.models.dit import Mlp, gelu_epilogue_applies

TINY = dict(input_size=8, num_classes=10, attn_backend="reference", mod_backend="reference")
PATTERNS = ["causal", "diagonal", "window", "first"]


def tiny_dit(**kw):
    return randomize(DiT("DiT-tiny/2", **{**TINY, **kw}))


def tiny_ardit(history_layers=2, pattern="causal", **kw):
    return randomize(ARDiT("DiT-tiny/2", history_layers=history_layers, pattern=pattern, cache_backend="torch",
                           **{**TINY, **kw}))


# ------------------------------------------------------------------------------------------ configs
def test_configs_cover_the_dit_family():
    for size, (depth, hidden, heads) in {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
                                         "XL": (28, 1152, 16)}.items():
        for patch in (2, 4, 8):
            cfg = CONFIGS[f"DiT-{size}/{patch}"]
            assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (depth, hidden, heads, patch)
    assert get_config("DiT-XL-2") is CONFIGS["DiT-XL/2"]
    assert CONFIGS["DiT-XL/2"].head_dim == 72
    assert CONFIGS["DiT-tiny/2"].head_dim == 16
    with pytest.raises(ValueError, match="config"):
        get_config("DiT-XXL/2")
    with pytest.raises(ValueError, match="num_heads"):
        DiTConfig(depth=2, hidden_size=64, patch_size=2, num_heads=5)


# ----------------------------------------------------------------------------------- checkpoint layout
def expected_dit_xl2_keys():
    """The original DiT-XL/2 (256², learn_sigma, 1000 classes + null) state dict, written out by hand."""
    c, p, depth = 1152, 2, 28
    keys = {
        "pos_embed": (1, 256, c),
        "x_embedder.proj.weight": (c, 4, p, p),
        "x_embedder.proj.bias": (c,),
        "t_embedder.mlp.0.weight": (c, 256),
        "t_embedder.mlp.0.bias": (c,),
        "t_embedder.mlp.2.weight": (c, c),
        "t_embedder.mlp.2.bias": (c,),
        "y_embedder.embedding_table.weight": (1001, c),
        "final_layer.linear.weight": (p * p * 8, c),
        "final_layer.linear.bias": (p * p * 8,),
        "final_layer.adaLN_modulation.1.weight": (2 * c, c),
        "final_layer.adaLN_modulation.1.bias": (2 * c,),
    }
    for i in range(depth):
        keys.update({
            f"blocks.{i}.attn.qkv.weight": (3 * c, c),
            f"blocks.{i}.attn.qkv.bias": (3 * c,),
            f"blocks.{i}.attn.proj.weight": (c, c),
            f"blocks.{i}.attn.proj.bias": (c,),
            f"blocks.{i}.mlp.fc1.weight": (4 * c, c),
            f"blocks.{i}.mlp.fc1.bias": (4 * c,),
            f"blocks.{i}.mlp.fc2.weight": (c, 4 * c),
            f"blocks.{i}.mlp.fc2.bias": (c,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * c, c),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * c,),
        })
    return keys


def test_dit_xl2_state_dict_matches_the_original_layout():
    with torch.device("meta"):
        model = DiT("DiT-XL/2")
    expected = expected_dit_xl2_keys()
    assert len(expected) == 292
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    # The original DiT-XL/2's parameter count (pos_embed included, as its training script counts).
    assert sum(p.numel() for p in model.parameters()) == 675_129_632 == DiT.expected_num_params("DiT-XL/2")
    assert not model.pos_embed.requires_grad
    # A checkpoint with exactly these names and shapes loads strictly (meta: no memory needed).
    sd = {k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    model.load_state_dict(sd, strict=True)


def test_ardit_has_the_published_head_layout_and_loads_it():
    with torch.device("meta"):
        student = ARDiT("DiT-XL/2", history_layers=6, steps=4)
    keys = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    expected = expected_dit_xl2_keys()
    for k in (2, 3, 4):
        for name in ("linear.weight", "linear.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"):
            expected[f"final_layer{k}.{name}"] = expected[f"final_layer.{name}"]
    assert keys == expected
    student.load_state_dict({k: torch.empty(s, device="meta") for k, s in expected.items()}, strict=True)


@pytest.mark.parametrize("fmt", ["dict", "pt", "safetensors", "ema"])
def test_from_dit_copies_the_final_layer_into_every_head(tmp_path, fmt):
    teacher = tiny_dit()
    sd = teacher.state_dict()
    if fmt == "pt":
        src = tmp_path / "dit.pt"
        torch.save(sd, src)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        src = tmp_path / "dit.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(src))
    elif fmt == "ema":
        src = tmp_path / "ckpt.pt"
        torch.save({"model": {k: v + 1 for k, v in sd.items()}, "ema": sd, "opt": {}}, src)
    else:
        src = sd
    student = ARDiT.from_dit(src, history_layers=1, steps=3, attn_backend="reference", mod_backend="reference")
    assert student.config == CONFIGS["DiT-tiny/2"] and student.input_size == 8 and student.num_classes == 10
    assert len(student.heads) == 3
    for head in student.heads:
        for (name, p), q in zip(head.named_parameters(), teacher.final_layer.parameters()):
            assert torch.equal(p, q), name
    for name, p in teacher.named_parameters():
        assert torch.equal(student.get_parameter(name), p), name


def test_dit_from_checkpoint_round_trips(tmp_path):
    teacher = tiny_dit(learn_sigma=False)
    torch.save(teacher.state_dict(), tmp_path / "dit.pt")
    loaded = DiT.from_checkpoint(tmp_path / "dit.pt", attn_backend="reference", mod_backend="reference").eval()
    assert not loaded.learn_sigma and loaded.input_size == 8
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), teacher(x, t, y), rtol=0, atol=0)


def test_ardit_loads_a_position_table_stored_per_block():
    student = tiny_ardit()
    sd = student.state_dict()
    sd["pos_embed"] = sd["pos_embed"].repeat(1, student.steps, 1)
    student.load_state_dict(sd, strict=True)
    assert student.pos_embed.shape == (1, student.num_tokens, 64)


def test_from_checkpoint_reads_size_and_k_from_a_per_block_position_table(tmp_path):
    """4 blocks × 16 tokens = 64 rows = 8², a square: the table must not be read as a 16² latent's grid."""
    student = randomize(ARDiT("DiT-tiny/2", input_size=8, num_classes=10, history_layers=2, steps=4))
    sd = {k: v.clone() for k, v in student.state_dict().items()}
    sd["pos_embed"] = sd["pos_embed"].repeat(1, 4, 1)
    assert infer_dit_kwargs(sd)["input_size"] == 8
    for source in (sd, student.state_dict()):
        loaded = ARDiT.from_checkpoint(source, history_layers=2).eval()
        assert (loaded.input_size, loaded.num_tokens, loaded.steps) == (8, 16, 4)
        for name, p in student.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], p), name
    three = ARDiT("DiT-tiny/2", input_size=8, num_classes=10, history_layers=1, steps=3)
    assert ARDiT.from_checkpoint(three.state_dict(), history_layers=1).steps == 3  # K from the heads
    # a grid really 8×8 tokens, not a repeated table, keeps its size
    assert infer_dit_kwargs(DiT("DiT-tiny/2", input_size=16, num_classes=10).state_dict())["input_size"] == 16
    del sd["final_layer3.linear.weight"], sd["final_layer3.linear.bias"]
    with pytest.raises(ValueError, match="final_layer2..final_layerK"):
        infer_dit_kwargs({k: v for k, v in sd.items() if not k.startswith("final_layer3.")})


def test_infer_dit_kwargs_reads_the_sizes_back():
    model = DiT("DiT-tiny/4", input_size=16, in_channels=3, num_classes=7, learn_sigma=False)
    kw = infer_dit_kwargs(model.state_dict())
    assert kw == dict(config="DiT-tiny/4", input_size=16, in_channels=3, num_classes=7, learn_sigma=False,
                      class_dropout_prob=0.1)


# --------------------------------------------------------------------------------------- DiT semantics
def test_position_table_is_dits_2d_sincos():
    d, g = 16, 4
    table = sincos_pos_embed_2d(d, g)
    assert table.shape == (g * g, d)
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    for row in range(g):
        for col in range(g):
            phi_col = torch.cat([torch.sin(col * omega), torch.cos(col * omega)])
            phi_row = torch.cat([torch.sin(row * omega), torch.cos(row * omega)])
            torch.testing.assert_close(table[row * g + col], torch.cat([phi_col, phi_row]).float())
    model = DiT("DiT-tiny/2", **TINY)
    assert "pos_embed" in model.state_dict() and not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed_2d(64, 4))


def test_initialisation_is_adaln_zero():
    model = DiT("DiT-tiny/2", **TINY).eval()
    for block in model.blocks:
        assert not block.adaLN_modulation[1].weight.any() and not block.adaLN_modulation[1].bias.any()
    assert not model.final_layer.linear.weight.any()
    x = torch.randn(2, 4, 8, 8)
    out = model(x, torch.tensor([3.0, 700.0]), torch.tensor([1, 2]))
    assert out.shape == (2, 8, 8, 8) and not out.any()  # zero heads: zero output


def naive_dit_forward(model, x, t, y):
    """The original DiT's forward spelled out with plain torch ops (per-sample modulation, full SDPA)."""
    p, c_out, h_dim = model.patch_size, model.out_channels, model.hidden_size
    heads = model.num_heads
    tok = F.conv2d(x, model.x_embedder.proj.weight, model.x_embedder.proj.bias, stride=p).flatten(2).transpose(1, 2)
    tok = tok + model.pos_embed
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    mlp = model.t_embedder.mlp
    c = F.linear(F.silu(F.linear(t_freq, mlp[0].weight, mlp[0].bias)), mlp[2].weight, mlp[2].bias)
    c = c + model.y_embedder.embedding_table.weight[y]

    def modulate(v, shift, scale):
        return F.layer_norm(v, (h_dim,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    for blk in model.blocks:
        mod = F.linear(F.silu(c), blk.adaLN_modulation[1].weight, blk.adaLN_modulation[1].bias).chunk(6, dim=1)
        h = modulate(tok, mod[0], mod[1])
        b, n, _ = h.shape
        qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, h_dim)
        tok = tok + mod[2][:, None] * F.linear(a, blk.attn.proj.weight, blk.attn.proj.bias)
        h = modulate(tok, mod[3], mod[4])
        h = F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias), approximate="tanh"),
                     blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        tok = tok + mod[5][:, None] * h
    fl = model.final_layer
    shift, scale = F.linear(F.silu(c), fl.adaLN_modulation[1].weight, fl.adaLN_modulation[1].bias).chunk(2, dim=1)
    out = F.linear(modulate(tok, shift, scale), fl.linear.weight, fl.linear.bias)
    g = model.input_size // p
    out = out.reshape(-1, g, g, p, p, c_out).permute(0, 5, 1, 3, 2, 4)  # n c h p w q
    return out.reshape(-1, c_out, g * p, g * p)


@pytest.mark.parametrize("attn_backend,mod_backend", [("reference", "reference"), ("sdpa", "reference"),
                                                      ("triton", "triton")])
def test_dit_forward_matches_the_original_formulation(attn_backend, mod_backend):
    """Also with the Triton kernels (interpreted here): the fused residual + LayerNorm boundaries
    between blocks and before the head compute the original's separate ops."""
    model = tiny_dit(attn_backend=attn_backend, mod_backend=mod_backend)
    # The kernels sum LayerNorm rows in another order than PyTorch: fp32 rounding, ~3e-6 of the output's scale.
    tol = dict(rtol=1e-5, atol=1e-5 if mod_backend == "reference" else 5e-5)
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.0, 499.5, 999.0])
    y = torch.tensor([0, 9, 10])  # 10 = null class
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), naive_dit_forward(model, x, t, y), **tol)
    # Training-mode forward with grad (the out-of-place residual path) agrees too; dropout off.
    model.y_embedder.dropout_prob = 0.0
    model.train()
    torch.testing.assert_close(model(x, t, y), naive_dit_forward(model, x, t, y), **tol)


def test_forward_with_cfg_guides_the_first_three_channels_like_dit():
    model = tiny_dit()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([400.0, 400.0])
    y = torch.tensor([3, 10])
    with torch.no_grad():
        out = model.forward_with_cfg(torch.cat([x[:1], x[:1]]), t, y, cfg_scale=4.0)
        raw = model(torch.cat([x[:1], x[:1]]), t, y)
        guided = raw[1:, :3] + 4.0 * (raw[:1, :3] - raw[1:, :3])
        torch.testing.assert_close(out[:, :3], torch.cat([guided, guided]))
        torch.testing.assert_close(out[:, 3:], raw[:, 3:])
        all_c = model.forward_with_cfg(torch.cat([x[:1], x[:1]]), t, y, cfg_scale=4.0, guidance_channels=4)
        torch.testing.assert_close(all_c[:1, 3], (raw[1:, 3] + 4.0 * (raw[:1, 3] - raw[1:, 3])))


def test_label_dropout_in_training():
    model = tiny_dit(class_dropout_prob=1.0)
    model.train()
    y = torch.tensor([1, 2, 3])
    dropped = model.y_embedder(y, train=True)
    torch.testing.assert_close(dropped, model.y_embedder.embedding_table.weight[[10, 10, 10]])
    kept = model.y_embedder(y, train=False)
    torch.testing.assert_close(kept, model.y_embedder.embedding_table.weight[y])
    forced = model.y_embedder(y, train=False, force_drop_ids=torch.tensor([0, 1, 0]))
    torch.testing.assert_close(forced, model.y_embedder.embedding_table.weight[[1, 10, 3]])


# ------------------------------------------------------------------------------------ ARDiT training
def test_block_times():
    student = tiny_ardit()
    torch.testing.assert_close(student.block_times(), torch.tensor([999.0, 749.25, 499.5, 249.75]), rtol=0, atol=0)


def test_forward_train_without_history_is_the_teacher_per_block():
    """N = 0: block k is DiT.forward at t_k with head k as the final layer."""
    student = tiny_ardit(history_layers=0)
    states = torch.randn(2, 4, 4, 8, 8)
    y = torch.tensor([5, 10])
    with torch.no_grad():
        pred = student.forward_train(states, y)
        assert pred.shape == (2, 4, 8, 8, 8)
        times = student.block_times()
        for k, head in enumerate(student.heads):
            teacher = DiT("DiT-tiny/2", **TINY).eval()
            sd = {key: v for key, v in student.state_dict().items() if not key.startswith("final_layer")}
            sd.update({f"final_layer.{n}": v for n, v in head.state_dict().items()})
            teacher.load_state_dict(sd, strict=True)
            expected = teacher(states[:, k], times[k].expand(2), y)
            torch.testing.assert_close(pred[:, k], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_forward_train_history_follows_the_pattern(pattern):
    """Changing state j changes prediction k exactly when k's history can see j.

    One history layer, so reach is direct (with two, "window" would reach two blocks back).
    """
    student = tiny_ardit(history_layers=1, pattern=pattern)
    from ard_kernels.masks import pattern_table

    table = pattern_table(pattern, 4)
    states = torch.randn(1, 4, 4, 8, 8)
    y = torch.tensor([2])
    with torch.no_grad():
        base = student.forward_train(states, y)
        for j in range(4):
            bumped = states.clone()
            bumped[:, j] += 1.0
            diff = (student.forward_train(bumped, y) - base).abs().flatten(2).amax(-1)[0]
            for k in range(4):
                assert bool(diff[k] > 1e-6) == bool(table[k, j] or k == j), (pattern, j, k, diff)


def test_forward_train_backward_reaches_every_head():
    student = tiny_ardit(history_layers=2)
    student.train()
    pred = student.forward_train(torch.randn(2, 4, 4, 8, 8), torch.tensor([1, 2]))
    pred[:, :, :4].square().mean().backward()
    for head in student.heads:
        assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0
    assert student.pos_embed.grad is None


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="history_layers"):
        ARDiT("DiT-tiny/2", history_layers=5, **TINY)
    with pytest.raises(ValueError, match="steps"):
        ARDiT("DiT-tiny/2", history_layers=2, steps=0, **TINY)
    with pytest.raises(ValueError, match="pattern"):
        ARDiT("DiT-tiny/2", history_layers=2, pattern="banded", **TINY)
    student = tiny_ardit()
    with pytest.raises(ValueError, match="states"):
        student.forward_train(torch.randn(2, 3, 4, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="y"):
        student.forward_train(torch.randn(2, 4, 4, 8, 8), torch.tensor([1]))


# ------------------------------------------------------------------------------- MLP GELU epilogue
def test_gelu_epilogue_is_never_taken_on_the_cpu():
    """On the CPU ``_addmm_activation`` applies the exact GELU, not DiT's tanh one: the Mlp must not use it."""
    mlp = Mlp(16, 64)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert not gelu_epilogue_applies(x, mlp.fc1)
        torch.testing.assert_close(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh")), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_gelu_epilogue_computes_dits_mlp(dtype):
    """fc1 + tanh-GELU as one cuBLASLt GEMM, in inference only: as close to the fp32 MLP as the two-op
    MLP in that dtype; with autograd or autocast on, the two-op path (the epilogue has neither)."""
    torch.manual_seed(0)
    mlp = Mlp(1152, 4608).cuda()
    x = torch.randn(2, 256, 1152, device="cuda")
    with torch.no_grad():
        want = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))
        lowp = mlp.to(dtype)
        xl = x.to(dtype)
        assert gelu_epilogue_applies(xl, lowp.fc1)
        fused = lowp(xl)
        two_op = lowp.fc2(F.gelu(lowp.fc1(xl), approximate="tanh"))
    err, base = (fused.float() - want).abs().max().item(), (two_op.float() - want).abs().max().item()
    assert fused.dtype == dtype and err <= 2 * base + 1e-5, (err, base)
    assert not gelu_epilogue_applies(xl, lowp.fc1)  # grad mode is on again
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert not gelu_epilogue_applies(x, mlp.float().fc1)


def test_embed_writes_a_token_major_stream_in_one_add():
    """Patches as a transposed view plus the position table: contiguous tokens, the original's values."""
    model = tiny_dit()
    x = torch.randn(3, 4, 8, 8)
    patches = model.x_embedder(x)
    assert not patches.is_contiguous()  # the view the original returns; the add lays it out
    tokens = model.embed(x)
    assert tokens.is_contiguous()
    want = F.conv2d(x, model.x_embedder.proj.weight, model.x_embedder.proj.bias, stride=model.patch_size)
    torch.testing.assert_close(tokens, want.flatten(2).transpose(1, 2) + model.pos_embed, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_forward_train_fused_boundaries_equal_the_block_by_block_path(backend, monkeypatch):
    """Unsharded students fuse every block boundary (run_blocks); FSDP-sharded ones run block by block:
    the same predictions and gradients."""
    student = tiny_ardit(attn_backend=backend, mod_backend=backend)
    states, y = torch.randn(2, 4, 4, 8, 8), torch.tensor([1, 7])
    params = [p for p in student.parameters() if p.requires_grad]

    def run():
        out = student.forward_train(states, y)
        return [out, *torch.autograd.grad(out.square().mean(), params)]

    assert not student._blocks_sharded()
    fused = run()
    monkeypatch.setattr(ARDiT, "_blocks_sharded", lambda self: True)
    for a, b in zip(fused, run()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ torch.compile
@pytest.mark.slow
def test_forward_train_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the whole training forward and its backward with the Triton
    ops (custom ops with fake implementations), also with a symbolic batch size: the same predictions and
    gradients as eager."""
    student = tiny_ardit(attn_backend="triton", mod_backend="triton")
    states, y = torch.randn(2, 4, 4, 8, 8), torch.tensor([1, 7])
    params = [p for p in student.parameters() if p.requires_grad]

    def run(fn):
        out = fn(states, y)
        return [out, *torch.autograd.grad(out.square().mean(), params)]

    compiled_fn = torch.compile(student.forward_train, fullgraph=True, backend="aot_eager")
    for a, b in zip(run(student.forward_train), run(compiled_fn)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # A second batch size recompiles with the batch dimension symbolic (dynamo's automatic dynamic shapes).
    states, y = torch.randn(3, 4, 4, 8, 8), torch.tensor([1, 7, 2])
    for a, b in zip(run(student.forward_train), run(compiled_fn)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cached_step_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces a KV-cached sampling step (cache appends, cached attention,
    fused in-place LayerNorms): step by step the same outputs as eager."""
    from ard_kernels.sampling import make_cache

    student = tiny_ardit(attn_backend="triton", mod_backend="triton")
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 7])
    step = torch.compile(student.forward_step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        c = student.condition(y)
        mods = student.step_modulations(c)
        caches = [make_cache(student, 2, torch.float32, noise.device) for _ in range(2)]
        x_eager = x_compiled = noise
        for k in range(student.steps):
            want = student.forward_step(x_eager, k, c, caches[0], mods=mods)
            got = step(x_compiled, k, c, caches[1], mods=mods)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            x_eager, x_compiled = want[:, :4], got[:, :4]
