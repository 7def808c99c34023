"""CLIP text encoders, tokenization and encode_prompts: parity with transformers/diffusers on tiny models.

Everything is built here (vocab, merges, configs, random weights) and saved with save_pretrained; nothing is
downloaded.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddspo_jax.convert.clip import detect_layout, export_clip_text, load_clip_text
from ddspo_jax.convert.common import ConversionError, read_state_dict, write_safetensors
from ddspo_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, count_params
from ddspo_jax.backbones.text import (
    MissingComponentError,
    PromptEncoder,
    PromptTruncationWarning,
    encode_prompts,
    load_tokenizer,
)

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "a n", "an d</w>"]
PROMPTS = ["the cat and the dog", "a dog!", "zebra quartz"]


def _vocab() -> dict[str, int]:
    vocab: dict[str, int] = {}
    for tok in [*LETTERS, *(c + "</w>" for c in LETTERS), "!", "!</w>", *("".join(m.split()) for m in MERGES),
                "<|startoftext|>", "<|endoftext|>"]:
        vocab[tok] = len(vocab)
    return vocab  # EOS is the largest id, as in the real CLIP vocab (the legacy argmax pooling relies on it)


VOCAB = _vocab()
BOS, EOS = VOCAB["<|startoftext|>"], VOCAB["<|endoftext|>"]
VOCAB_SIZE = len(VOCAB) + 4


def _make_tokenizer(folder, pad_token="<|endoftext|>"):
    """A CLIP tokenizer from vocab.json + merges.txt written here (SDXL's tokenizer_2 pads with "!")."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(VOCAB))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token=pad_token)
    assert tok.pad_token_id == VOCAB[pad_token] and tok.eos_token_id == EOS
    return tok


def _torch_config(hidden, layers, heads, act, eos, projection_dim=16, architectures=None):
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden + 3, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=projection_dim,
        bos_token_id=BOS, eos_token_id=eos, pad_token_id=1, layer_norm_eps=1e-5)


def _randomize(model, seed):
    """Non-trivial LayerNorm/bias values so a swapped or untransposed weight cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if ("norm" in name and name.endswith("weight")) else
                    (0.1 if p.ndim == 1 else 0.2) * noise)
    return model.eval()


def _assert_close(got, want, rtol=1e-5, name=""):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    scale = max(1.0, float(np.max(np.abs(want))) if want.size else 0.0)
    print(f"{name}: max abs diff {diff:.3g} (scale {scale:.3g})")
    assert diff <= rtol * scale, f"{name}: max abs diff {diff:.3g} vs scale {scale:.3g}"
    return diff


def _ids(seed=0):
    """Row 0 pads with EOS (tokenizer 1), row 1 pads with 0 ("!", tokenizer 2) and holds an id above EOS after
    its EOS (so legacy argmax pooling and first-EOS pooling pick different positions), row 2 is full."""
    ids = np.random.default_rng(seed).integers(0, BOS, (3, 77))
    ids[:, 0] = BOS
    ids[0, 5:] = EOS
    ids[1, 40], ids[1, 41:], ids[1, 50] = EOS, 0, EOS + 2
    ids[2, 76] = EOS
    return ids


# ------------------------------------------------------------------------------- the encoders


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """Both variants (quick_gelu + new-style eos; gelu + legacy eos=2), in both key layouts."""
    root = tmp_path_factory.mktemp("clip")
    out = {}
    for name, cls, act, eos in (("text", transformers.CLIPTextModel, "quick_gelu", EOS),
                                ("proj", transformers.CLIPTextModelWithProjection, "gelu", 2)):
        model = _randomize(cls(_torch_config(32, 3, 4, act, eos)), seed=len(name))
        native = root / f"{name}_native"
        model.save_pretrained(native)
        sd = read_state_dict(native)
        layout = detect_layout(sd)
        assert layout == ("bare" if name == "text" else "prefixed")  # what transformers 5 writes
        other = root / f"{name}_other"
        other.mkdir()
        shutil.copy(native / "config.json", other / "config.json")
        if layout == "bare":  # transformers 4 layout: everything under text_model., plus the position_ids buffer
            alt = {f"text_model.{k}": v for k, v in sd.items()}
            alt["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
        else:
            alt = {k.removeprefix("text_model."): v for k, v in sd.items()}
            sd_with_buffer = dict(sd, **{"text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None]})
            write_safetensors(sd_with_buffer, native / "model.safetensors")
        write_safetensors(alt, other / "model.safetensors")
        out[name] = (model, native, other)
    return out


@pytest.mark.parametrize("variant", ["text", "proj"])
@pytest.mark.parametrize("which", ["native", "other"])
def test_clip_parity(clip_folders, variant, which):
    torch_model, native, other = clip_folders[variant]
    model, params = load_clip_text(native if which == "native" else other)
    assert model.config.with_projection == (variant == "proj")
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    ids = _ids()
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids), output_hidden_states=True)
    got = jax.jit(model.apply)({"params": params}, ids)
    _assert_close(got["last_hidden_state"], ref.last_hidden_state, name="last_hidden_state")
    assert len(got["hidden_states"]) == len(ref.hidden_states) == 4
    for i, (g, r) in enumerate(zip(got["hidden_states"], ref.hidden_states)):
        _assert_close(g, r, name=f"hidden_states[{i}]")
    if variant == "proj":
        _assert_close(got["text_embeds"], ref.text_embeds, name="text_embeds")
    else:
        _assert_close(got["pooler_output"], ref.pooler_output, name="pooler_output")


def test_clip_attention_mask_parity(clip_folders):
    """SD-1 pipelines pass the padding mask when the config sets use_attention_mask; it must match too."""
    torch_model, native, _ = clip_folders["text"]
    model, params = load_clip_text(native)
    ids = _ids()
    mask = (np.arange(77)[None] <= np.array([5, 40, 76])[:, None]).astype(np.int64)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    got = jax.jit(model.apply)({"params": params}, ids, mask)
    _assert_close(got["last_hidden_state"], ref.last_hidden_state, name="masked last_hidden_state")


def test_bf16_compute_keeps_f32_params(clip_folders):
    torch_model, native, _ = clip_folders["proj"]
    model, params = load_clip_text(native, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    got = jax.jit(model.apply)({"params": params}, _ids())
    assert got["text_embeds"].dtype == jnp.bfloat16
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(_ids())).text_embeds.numpy()
    assert np.max(np.abs(np.asarray(got["text_embeds"], np.float32) - ref)) < 0.1 * max(1, np.abs(ref).max())


@pytest.mark.parametrize("variant", ["text", "proj"])
def test_export_round_trip(clip_folders, tmp_path, variant):
    torch_model, native, _ = clip_folders[variant]
    model, params = load_clip_text(native)
    export_clip_text(model, params, tmp_path / "out")
    # identical bytes back through our loader, and transformers itself reads the export
    sd_in, sd_out = read_state_dict(native), read_state_dict(tmp_path / "out")
    assert detect_layout(sd_out) == detect_layout({k: v for k, v in sd_in.items() if "position_ids" not in k})
    assert set(sd_out) == set(sd_in) - {"text_model.embeddings.position_ids"}
    for k, v in sd_out.items():
        np.testing.assert_array_equal(v, sd_in[k])
    cls = type(torch_model)
    reloaded = cls.from_pretrained(str(tmp_path / "out")).eval()
    ids = torch.from_numpy(_ids())
    with torch.no_grad():
        a, b = torch_model(ids), reloaded(ids)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=0, atol=0)


def test_missing_and_mismatched_weights_are_named(clip_folders, tmp_path):
    _, native, _ = clip_folders["proj"]
    sd = read_state_dict(native)
    del sd["text_projection.weight"]
    sd["text_model.encoder.layers.0.mlp.fc1.weight"] = sd["text_model.encoder.layers.0.mlp.fc1.weight"][:, :-1]
    (tmp_path / "bad").mkdir()
    shutil.copy(native / "config.json", tmp_path / "bad" / "config.json")
    write_safetensors(sd, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(ConversionError) as e:
        load_clip_text(tmp_path / "bad")
    assert "text_projection.weight" in str(e.value) and "layers.0.mlp.fc1.weight" in str(e.value)


def test_load_from_pipeline_folder_and_single_file(sdxl):
    pipe, folder = sdxl
    model, params = load_clip_text(folder, component="text_encoder_2")
    assert model.config.with_projection and model.config.hidden_size == 48
    file = folder / "text_encoder_2" / "model.safetensors"
    _, params_file = load_clip_text(file)  # config.json next to the file
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params_file)):
        np.testing.assert_array_equal(a, b)
    ids = _ids()
    with torch.no_grad():
        ref = pipe.text_encoder_2(torch.from_numpy(ids)).text_embeds
    got = jax.jit(model.apply)({"params": params}, ids)["text_embeds"]
    _assert_close(got, ref, name="pipeline text_encoder_2")


def test_unsupported_activation_is_named():
    with pytest.raises(ValueError, match="relu"):
        CLIPTextConfig.from_dict({"hidden_act": "relu", "hidden_size": 8, "num_attention_heads": 2})


# ------------------------------------------------------------------------------- real configs


@pytest.mark.parametrize("name,expected", [("sd15_text_encoder", 123_060_480),
                                           ("sdxl_text_encoder_2", 694_659_840)])
def test_real_config_param_counts(name, expected):
    model = CLIPTextModel(CLIPTextConfig.named(name))
    assert count_params(model.init_shapes()) == expected  # jax.eval_shape: no memory allocated


# ------------------------------------------------------------------------------- tokenization


def test_tokenizer_from_local_files(tmp_path):
    tok = _make_tokenizer(tmp_path / "tok")
    enc = tok(PROMPTS, padding="max_length", max_length=77, truncation=True)
    assert all(len(x) == 77 for x in enc["input_ids"])
    assert tok.convert_ids_to_tokens(enc["input_ids"][0][:6]) == ["<|startoftext|>", "the</w>", "cat</w>",
                                                                   "and</w>", "the</w>", "dog</w>"]
    assert load_tokenizer(tmp_path / "tok")(PROMPTS[0])["input_ids"] == tok(PROMPTS[0])["input_ids"]
    with pytest.raises(ConversionError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


# ------------------------------------------------------------------------------- pipelines


def _sdxl_pipeline(tokenizers, force_zeros=True):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    te1 = _randomize(transformers.CLIPTextModel(_torch_config(32, 3, 4, "quick_gelu", EOS)), 1)
    te2 = _randomize(transformers.CLIPTextModelWithProjection(_torch_config(48, 3, 4, "gelu", 2, projection_dim=24)), 2)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 24, cross_attention_dim=80, norm_num_groups=1)
    vae = AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=2, sample_size=32)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizers["tok"], tokenizer_2=tokenizers["tok2"],
        unet=unet, scheduler=EulerDiscreteScheduler(), force_zeros_for_empty_prompt=force_zeros,
        add_watermarker=False)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    return {"tok": _make_tokenizer(root / "tok"), "tok2": _make_tokenizer(root / "tok2", pad_token="!")}


@pytest.fixture(scope="module")
def sdxl(tokenizers, tmp_path_factory):
    pipe = _sdxl_pipeline(tokenizers, force_zeros=True)
    folder = tmp_path_factory.mktemp("sdxl") / "model"
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def sdxl_encoder(sdxl):
    return PromptEncoder.from_pretrained(sdxl[1])


LONG = " ".join(["the cat and the dog"] * 20)  # 100 words: over 77 tokens


def _pipe_embeds(pipe, prompts, negative=None):
    with torch.no_grad():
        out = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                 negative_prompt=negative)
    return [o.numpy() for o in out]


@pytest.mark.parametrize("negative", [None, ["a dog", "", "zebra"]])
def test_sdxl_encode_prompts_parity(sdxl, sdxl_encoder, negative):
    pipe, enc = sdxl[0], sdxl_encoder
    assert enc.kind == "sdxl" and enc.force_zeros_for_empty_prompt and enc.resolution == 16 * 2
    prompts = PROMPTS
    want = _pipe_embeds(pipe, prompts, negative)
    got = encode_prompts(enc, prompts, negative, original_size=(96, 64), crops_coords_top_left=(3, 5),
                         target_size=(32, 48))
    assert got["prompt_embeds"].shape == (3, 77, 32 + 48) and got["pooled_prompt_embeds"].shape == (3, 24)
    for key, ref in zip(("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                         "negative_pooled_prompt_embeds"), want):
        _assert_close(got[key], ref, name=key)
    if negative is None:  # force_zeros_for_empty_prompt
        assert not np.any(np.asarray(got["negative_prompt_embeds"]))
        assert not np.any(np.asarray(got["negative_pooled_prompt_embeds"]))
    ids = pipe._get_add_time_ids((96, 64), (3, 5), (32, 48), dtype=torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    np.testing.assert_array_equal(np.asarray(got["add_time_ids"]), np.repeat(ids.numpy(), 3, axis=0))
    assert int(got["num_truncated"]) == 0


def test_sdxl_empty_prompt_without_force_zeros(sdxl, tmp_path):
    pipe, folder = sdxl
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        want = _pipe_embeds(pipe, PROMPTS[:2])
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)
    local = tmp_path / "model"
    shutil.copytree(folder, local)
    index = json.loads((local / "model_index.json").read_text())
    index["force_zeros_for_empty_prompt"] = False
    (local / "model_index.json").write_text(json.dumps(index))
    enc = PromptEncoder.from_pretrained(local)
    neg = enc.encode_negative(2)
    assert np.any(np.asarray(neg["prompt_embeds"]))
    _assert_close(neg["prompt_embeds"], want[1], name="negative_prompt_embeds")
    _assert_close(neg["pooled_prompt_embeds"], want[3], name="negative_pooled_prompt_embeds")


def test_overlong_prompt_truncated_warned_and_counted(sdxl, sdxl_encoder):
    pipe, enc = sdxl[0], sdxl_encoder
    before = enc.truncated_total
    with pytest.warns(PromptTruncationWarning, match="1 of 2"):
        got = enc.encode([LONG, "a dog"])
    assert int(got["num_truncated"]) == 1 and enc.truncated_total == before + 1
    with pytest.warns(PromptTruncationWarning):
        counted = encode_prompts(enc, [LONG], [LONG])  # positive and negative both cut
    assert int(counted["num_truncated"]) == 2 and enc.truncated_total == before + 3
    want = _pipe_embeds(pipe, [LONG, "a dog"])  # diffusers truncates the same way
    _assert_close(got["prompt_embeds"], want[0], name="truncated prompt_embeds")
    _assert_close(got["pooled_prompt_embeds"], want[2], name="truncated pooled")


@pytest.mark.parametrize("component", ["tokenizer_2", "text_encoder_2", "text_encoder"])
def test_missing_component_is_named(sdxl, tmp_path, component):
    _, folder = sdxl
    local = tmp_path / "model"
    shutil.copytree(folder, local, ignore=shutil.ignore_patterns("unet", "vae"))
    shutil.rmtree(local / component)
    with pytest.raises(MissingComponentError) as e:
        PromptEncoder.from_pretrained(local)
    assert f"{component}/" in str(e.value) and str(local) in str(e.value)
    with pytest.raises(MissingComponentError, match="does not exist"):
        PromptEncoder.from_pretrained(tmp_path / "nothing")


def test_sd1_encode_prompts_parity(tokenizers, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    te = _randomize(transformers.CLIPTextModel(_torch_config(32, 2, 4, "quick_gelu", 2)), 5)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=2)
    vae = AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=2)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizers["tok"], unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "sd1")
    enc = PromptEncoder.from_pretrained(tmp_path / "sd1")
    assert enc.kind == "sd1"
    for negative in (None, ["a dog", "", "zebra"]):
        with torch.no_grad():
            want = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=negative)
        got = encode_prompts(enc, PROMPTS, negative)
        assert set(got) == {"prompt_embeds", "negative_prompt_embeds", "num_truncated"}
        _assert_close(got["prompt_embeds"], want[0], name="sd1 prompt_embeds")
        _assert_close(got["negative_prompt_embeds"], want[1], name="sd1 negative_prompt_embeds")
    shutil.rmtree(tmp_path / "sd1" / "tokenizer")
    with pytest.raises(MissingComponentError, match="tokenizer/"):
        PromptEncoder.from_pretrained(tmp_path / "sd1")
