"""Flax UNet vs diffusers on tiny random configs; load/export round trips; bad inputs; real param counts."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ddspo_jax.convert import export_unet, load_unet  # noqa: E402
from ddspo_jax.convert.common import (  # noqa: E402
    ConversionError, read_safetensors, state_dict_from_params, write_safetensors,
)
from ddspo_jax.convert.unet import UNET_TABLE  # noqa: E402
from ddspo_jax.models.unet import UNet2DConditionModel, UnsupportedConfigError, count_params  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "ddspo_jax" / "models" / "configs"

TINY = {
    # SD-1.x-like: 1x1-conv proj_in/out, one head count for every block.
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8),
    # SD-2-like: linear projection, per-block heads and transformer depth, only_cross_attention per block.
    "sd2": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
                attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                only_cross_attention=(True, False),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=8),
    # SDXL-like: text_time conditioning, DownBlock first, layers_per_block list, upcast attention,
    # unusual timestep embedding flags; run at an odd latent size (forwarded upsample sizes).
    "sdxl": dict(block_out_channels=(32, 32, 64), layers_per_block=(1, 2, 1), norm_num_groups=8,
                 cross_attention_dim=40, attention_head_dim=(2, 2, 4), transformer_layers_per_block=(1, 1, 2),
                 use_linear_projection=True, upcast_attention=True, flip_sin_to_cos=False, freq_shift=1,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), sample_size=10),
}


def _randomize(module, seed=0):
    """Default init plus noise, so biases / norm affines are not trivially 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def _inputs(name, batch=2):
    cfg = TINY[name]
    rng = np.random.default_rng(1)
    size = cfg["sample_size"]
    x = rng.standard_normal((batch, size, size, 4)).astype(np.float32)
    t = np.array([3, 781][:batch])
    ctx = rng.standard_normal((batch, 7, cfg["cross_attention_dim"])).astype(np.float32)
    added = None
    if cfg.get("addition_embed_type") == "text_time":
        added = {"text_embeds": rng.standard_normal((batch, 16)).astype(np.float32),
                 "time_ids": np.tile(np.array([[80, 80, 0, 0, 80, 80]], np.float32), (batch, 1))}
    return x, t, ctx, added


def _torch_forward(module, x, t, ctx, added):
    kw = {"added_cond_kwargs": {k: torch.tensor(v) for k, v in added.items()}} if added else {}
    with torch.no_grad():
        out = module(torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(t), torch.tensor(ctx), **kw).sample
    return out.float().numpy().transpose(0, 2, 3, 1)


def _flax_forward(model, params, x, t, ctx, added):
    return np.asarray(jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, x, t, ctx, added))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (folder, torch module, inputs, torch output), each model built and saved once."""
    root = tmp_path_factory.mktemp("unets")
    out = {}
    for i, (name, cfg) in enumerate(TINY.items()):
        torch.manual_seed(i)
        module = _randomize(diffusers.UNet2DConditionModel(**cfg).eval(), seed=i)
        folder = root / name
        module.save_pretrained(folder)
        inputs = _inputs(name)
        out[name] = (folder, module, inputs, _torch_forward(module, *inputs))
    return out


@pytest.fixture(scope="module")
def loaded(tiny):
    """name -> (model, params) converted once per module."""
    return {name: load_unet(tiny[name][0]) for name in TINY}


@pytest.mark.parametrize("name", list(TINY))
def test_parity_with_diffusers(tiny, loaded, name):
    folder, _, inputs, ref = tiny[name]
    model, params = loaded[name]
    out = _flax_forward(model, params, *inputs)
    assert out.shape == ref.shape
    err = np.abs(out - ref).max()
    scale = np.abs(ref).max()
    print(f"{name}: max abs diff {err:.3g}, output scale {scale:.3g}")
    assert err <= 1e-4 * scale


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_scanned_blocks_match_diffusers_and_the_unrolled_gradients(tiny, loaded, name):
    """model.scan_blocks: each Transformer2D's blocks (2 here) run as one lax.scan over stacked weights; the
    output still equals PyTorch's, and the gradients (block remat) equal the unrolled model's."""
    folder, _, inputs, ref = tiny[name]
    model, params = loaded[name]
    scanned = model.clone(scan_blocks=True, remat_policy="block")
    out = _flax_forward(scanned, params, *inputs)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, *inputs) ** 2)  # noqa: E731
    assert "scan[" in str(jax.make_jaxpr(loss(scanned))(params)) and "scan[" not in str(jax.make_jaxpr(loss(model))(params))
    got, want = jax.grad(loss(scanned))(params), jax.grad(loss(model))(params)
    for (k, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()) + 1e-7,
                                   err_msg=jax.tree_util.keystr(k))


def test_scanned_blocks_on_fsdp_shards_give_the_unsharded_gradients(tiny, loaded):
    """The train step's path (layers.apply_sharded: every block gathers its own shards) with scanned blocks and
    block remat, under fsdp 4 in float32: the gradients equal the unsharded, unrolled model's."""
    from ddspo_jax import parallel
    from ddspo_jax.models.layers import apply_sharded

    _, _, inputs, _ = tiny["sd2"]
    model, params = loaded["sd2"]
    x, t, ctx, _ = (jnp.asarray(a) if a is not None else None for a in inputs)
    x, t, ctx = jnp.concatenate([x, x[::-1]]), jnp.concatenate([t, t[::-1]]), jnp.concatenate([ctx, ctx[::-1]])
    mesh = parallel.make_mesh(1, 4, jax.devices()[:4])
    gather = parallel.Gather(parallel.fsdp_axes(params, 4), jnp.float32)
    scanned = model.clone(scan_blocks=True, remat_policy="block")
    specs = parallel.tree_specs(params, mesh)

    def local(p, x, t, ctx):
        return jax.grad(lambda p: jnp.sum(apply_sharded(scanned, gather, p, x, t, ctx) ** 2))(p)

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(specs, parallel.BATCH, parallel.BATCH, parallel.BATCH),
                              out_specs=specs, check_vma=False))
    placed = parallel.shard_tree(params, mesh)
    assert "scan[" in str(jax.make_jaxpr(f)(placed, x, t, ctx))
    got = f(placed, x, t, ctx)
    want = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t, ctx) ** 2))(params)
    for (k, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()) + 1e-7,
                                   err_msg=jax.tree_util.keystr(k))


def test_pipeline_folder_and_single_file(tiny, loaded, tmp_path):
    folder = tiny["sd1"][0]
    shutil.copytree(folder, tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    _, p_pipe = load_unet(tmp_path / "pipe")
    single = tmp_path / "single" / "my_unet.safetensors"
    single.parent.mkdir()
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", single)
    config = json.loads((folder / "config.json").read_text())
    _, p_single = load_unet(single, config=config)  # config given
    shutil.copy(folder / "config.json", single.parent / "config.json")
    _, p_next = load_unet(single)  # config next to it
    for p in (p_pipe, p_single, p_next):
        assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), loaded["sd1"][1], p))


def test_export_round_trip_loads_in_diffusers(tiny, loaded, tmp_path):
    folder, module, inputs, ref = tiny["sdxl"]
    model, params = loaded["sdxl"]
    # The key table is a bijection: state dict -> params -> state dict is the identity.
    sd = read_safetensors(folder / "diffusion_pytorch_model.safetensors")
    back = state_dict_from_params(UNET_TABLE, params)
    assert set(back) == set(sd)
    assert all(np.array_equal(back[k], sd[k]) for k in sd)

    export_unet(model, params, tmp_path / "f32")
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "f32").eval()
    np.testing.assert_array_equal(_torch_forward(reloaded, *inputs), ref)

    export_unet(model, params, tmp_path / "f16", dtype="fp16")
    assert {v.dtype for v in read_safetensors(tmp_path / "f16" / "diffusion_pytorch_model.safetensors").values()} \
        == {np.dtype(np.float16)}
    half = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "f16", torch_dtype=torch.float32).eval()
    np.testing.assert_allclose(_torch_forward(half, *inputs), ref, atol=2e-2 * np.abs(ref).max())

    export_unet(model, params, tmp_path / "bf16", dtype="bf16")
    _, p_bf16 = load_unet(tmp_path / "bf16")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.allclose(a, b, atol=1e-2, rtol=1e-2)), params, p_bf16))


def test_sharded_fp16_variant(tiny, loaded, tmp_path):
    """diffusers' sharded fp16 variant files (index + shards) load, upcast into float32 params."""
    _, module, _, _ = tiny["sd1"]
    module.save_pretrained(tmp_path, variant="fp16", max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _, p16 = load_unet(tmp_path, variant="fp16", attention_impl="auto")
    assert {a.dtype for a in jax.tree.leaves(p16)} == {jnp.dtype(jnp.float32)}
    close = lambda a, b: bool(np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-3 * (1 + np.abs(b).max()))
    assert jax.tree.all(jax.tree.map(close, p16, loaded["sd1"][1]))


def _write_weights(src_folder, dst_folder, edit):
    dst_folder.mkdir()
    shutil.copy(src_folder / "config.json", dst_folder / "config.json")
    sd = read_safetensors(src_folder / "diffusion_pytorch_model.safetensors")
    edit(sd)
    write_safetensors(sd, dst_folder / "diffusion_pytorch_model.safetensors")
    return dst_folder


def test_bad_weights_are_listed(tiny, tmp_path):
    folder = tiny["sd1"][0]
    k_missing = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    k_missing2 = "conv_out.bias"
    k_shape = "mid_block.resnets.1.conv1.weight"
    k_shape2 = "time_embedding.linear_1.weight"

    def edit(sd):
        del sd[k_missing], sd[k_missing2]
        sd["extra.weight"] = np.zeros(3, np.float32)
        sd["down_blocks.9.resnets.0.conv1.bias"] = np.zeros(3, np.float32)
        sd[k_shape] = sd[k_shape][:, :-1]
        sd[k_shape2] = sd[k_shape2].T.copy()

    bad = _write_weights(folder, tmp_path / "bad", edit)
    with pytest.raises(ConversionError) as e:
        load_unet(bad)
    msg = str(e.value)
    assert "2 missing keys" in msg and k_missing in msg and k_missing2 in msg
    assert "2 unexpected keys" in msg and "extra.weight" in msg and "down_blocks.9.resnets.0.conv1.bias" in msg
    assert "2 shape mismatches" in msg and k_shape in msg and k_shape2 in msg
    assert "file has (64, 63, 3, 3), model expects (64, 64, 3, 3)" in msg
    assert str(bad) in msg


def test_not_safetensors(tiny, tmp_path):
    folder = tiny["sd1"][0]
    pickled = tmp_path / "unet.bin"
    pickled.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ConversionError, match="not a .safetensors file"):
        load_unet(pickled, config=folder / "config.json")
    garbage = tmp_path / "unet.safetensors"
    garbage.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(ConversionError, match="not a readable safetensors file"):
        load_unet(garbage, config=folder / "config.json")
    only_bin = tmp_path / "binfolder"
    only_bin.mkdir()
    shutil.copy(folder / "config.json", only_bin / "config.json")
    (only_bin / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ConversionError, match="pickles are never loaded"):
        load_unet(only_bin)
    with pytest.raises(ConversionError, match="neither a unet folder"):
        load_unet(tmp_path)


def test_ldm_single_file_is_named(tiny, tmp_path):
    f = tmp_path / "sd15.safetensors"
    write_safetensors({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((2, 2), np.float32)}, f)
    with pytest.raises(ConversionError, match="LDM-layout"):
        load_unet(f, config=tiny["sd1"][0] / "config.json")


@pytest.mark.parametrize("field,value", [
    ("resnet_time_scale_shift", "scale_shift"), ("class_embed_type", "timestep"), ("num_class_embeds", 10),
    ("addition_embed_type", "text_image"), ("time_embedding_type", "fourier"), ("encoder_hid_dim", 32),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("act_fn", "mish"), ("some_future_field", 1),
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
])
def test_unsupported_config_names_the_field(tiny, field, value):
    cfg = json.loads((tiny["sd1"][0] / "config.json").read_text())
    cfg[field] = value
    with pytest.raises(UnsupportedConfigError, match=field):
        UNet2DConditionModel.from_config(cfg)


def test_sdxl_needs_added_cond(tiny, loaded):
    x, t, ctx, _ = tiny["sdxl"][2]
    model, params = loaded["sdxl"]
    with pytest.raises(ValueError, match="added_cond"):
        model.apply({"params": params}, x, t, ctx)


def test_remat_keeps_params_and_gradients(tiny, loaded):
    """Remat changes memory, not maths: same parameter tree, same gradients (checked on one block)."""
    from ddspo_jax.models.unet import Transformer2DModel, _Opts

    model, _ = loaded["sd1"]
    remat, _ = load_unet(tiny["sd1"][0], remat_policy="dots_saveable")
    assert jax.tree.structure(remat.init_shapes()) == jax.tree.structure(model.init_shapes())

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 16))
    ctx = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))
    grads = []
    for policy in ("none", "block", "full", "dots_saveable"):
        block = Transformer2DModel(2, 2, 4, False, False, _Opts(remat_policy=policy))
        p = block.init(jax.random.PRNGKey(2), x, ctx)
        grads.append(jax.jit(jax.grad(lambda p, x: jnp.sum(block.apply(p, x, ctx) ** 2), argnums=(0, 1)))(p, x))
    for g in grads[1:]:
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.abs(a - b).max() <= 1e-4 * jnp.abs(a).max()),
                                         grads[0], g))
    with pytest.raises(ValueError, match="remat_policy"):
        load_unet(tiny["sd1"][0], remat_policy="sometimes")


def test_bf16_compute_keeps_float32_params(tiny):
    folder, _, (x, t, ctx, added), ref = tiny["sd1"]
    bf16, p16 = load_unet(folder, dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(p16)} == {jnp.dtype(jnp.float32)}
    out = _flax_forward(bf16, p16, x, t, ctx, added)
    assert out.dtype == jnp.bfloat16
    assert np.abs(out.astype(np.float32) - ref).max() <= 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("name,expected", [("sd15_unet", 859_520_964), ("sdxl_unet", 2_567_463_684)])
def test_real_config_param_counts(name, expected):
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    model = UNet2DConditionModel.from_config(cfg)
    assert count_params(model.init_shapes()) == expected


def test_config_scan_blocks_reaches_the_loaded_denoiser():
    """`model.scan_blocks=True` in a config gives the backbone a denoiser that scans (the field every family's
    denoiser has); the default unrolls."""
    from ddspo_jax.backbones import load_backbone
    from ddspo_jax.config import base_config

    cfg = base_config()
    cfg.model.path = "tiny"
    assert load_backbone(cfg.model, cfg.schedule, text=False, vae=False, log=None).denoiser.scan_blocks is False
    cfg.model.scan_blocks = True
    assert load_backbone(cfg.model, cfg.schedule, text=False, vae=False, log=None).denoiser.scan_blocks is True
