"""CLIP image preprocessing and the CLIP-based scorers against transformers / PyTorch computations of the same
definitions, on tiny random models saved here (nothing is downloaded)."""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from ddspo_jax.errors import MissingFileError, ModelError, UserError
from ddspo_jax.scoring import make_scorer
from ddspo_jax.scoring.clip import AESTHETIC_CONVERSION, AESTHETIC_HEAD, ClipPreprocess

transformers = pytest.importorskip("transformers")
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

from test_clip_text import _make_tokenizer  # noqa: E402
from test_clip_vision import _randomize, clip_model_config, vision_config  # noqa: E402

PROMPTS = ["the cat and the dog", "a dog!", "zebra quartz and a cat", "the the"]


def _processor(size=16, crop=16, resample=3):
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop},
                                 resample=resample)


def _images(n, size, seed):
    return np.random.default_rng(seed).random((n, size, size, 3)).astype(np.float32)


def _pil(images):
    return [Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)) for x in images]


@pytest.mark.parametrize("shape,size,crop,resample", [
    ((37, 37), 16, 16, 3), ((23, 23), 16, 14, 3), ((64, 64), 24, 20, 2), ((9, 9), 16, 16, 3),
    ((512, 512), 224, 224, 3), ((16, 37), 16, 16, 3), ((41, 20), 20, 18, 1), ((16, 16), 16, 16, 3),
])
def test_preprocess_equals_the_pil_image_processor(shape, size, crop, resample):
    """Bit-exact against transformers' CLIPImageProcessor (PIL backend) on the PNG of the same image: square
    images (what evaluate generates) of odd and even sizes, and images resized along one axis."""
    img = np.random.default_rng(sum(shape)).random((*shape, 3)).astype(np.float32)
    want = _processor(size, crop, resample)(images=_pil(img[None]), return_tensors="np")["pixel_values"]
    got = ClipPreprocess(shortest_edge=size, crop=(crop, crop), resample=resample)(jnp.asarray(img[None]))
    np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), atol=2e-6)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return make_clip_folder(tmp_path_factory.mktemp("clip") / "model")


def make_clip_folder(folder):
    """A CLIPModel folder as PickScore / OpenAI CLIP ship it: weights, tokenizer and preprocessor config."""
    tok = _make_tokenizer(folder / "tok")
    cfg = clip_model_config(vocab=len(tok) + 4)
    cfg.text_config.eos_token_id, cfg.text_config.bos_token_id = tok.eos_token_id, tok.bos_token_id
    model = _randomize(transformers.CLIPModel(cfg), 3)
    model.save_pretrained(folder)
    transformers.CLIPProcessor(image_processor=_processor(), tokenizer=tok).save_pretrained(folder)
    return folder, model


def _reference_embeds(folder, model, images, prompts):
    proc = transformers.CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(folder),
                                      tokenizer=transformers.CLIPTokenizer.from_pretrained(folder))
    inputs = proc(text=list(prompts), images=_pil(images), return_tensors="pt", padding=True, truncation=True,
                  max_length=77)
    with torch.no_grad():
        out = model(**inputs)
    return out.image_embeds.numpy().astype(np.float64), out.text_embeds.numpy().astype(np.float64), model


def test_clip_score_equals_the_torchmetrics_definition(clip_folder):
    folder, model = clip_folder
    images = _images(4, 20, 0)
    img, txt, _ = _reference_embeds(folder, model, images, PROMPTS)
    want = 100.0 * np.maximum(np.sum(img * txt, -1), 0.0)  # embeds already L2-normalised by CLIPModel
    got = make_scorer("clip_score", str(folder)).score(images, PROMPTS)
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_pickscore_and_its_preference_equal_pickscore_inference(clip_folder):
    folder, model = clip_folder
    a, b = _images(4, 16, 1), _images(4, 16, 2)
    scale = float(model.logit_scale.detach().exp())
    ia, txt, _ = _reference_embeds(folder, model, a, PROMPTS)
    ib, _, _ = _reference_embeds(folder, model, b, PROMPTS)
    sa, sb = scale * np.sum(ia * txt, -1), scale * np.sum(ib * txt, -1)
    scorer = make_scorer("pickscore", str(folder))
    np.testing.assert_allclose(scorer.score(a, PROMPTS), sa, atol=1e-4)
    probs = torch.softmax(torch.tensor(np.stack([sa, sb], -1)), -1)[:, 0].numpy()
    np.testing.assert_allclose(scorer.prefer(a, b, PROMPTS), probs, atol=1e-5)


class _PublishedHead(torch.nn.Module):
    """The improved-aesthetic-predictor MLP exactly as published (sac+logos+ava1-l14-linearMSE.pth)."""

    def __init__(self, d):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(d, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                                          torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                                          torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def test_aesthetic_equals_the_published_predictor(tmp_path):
    folder = tmp_path / "vitl"
    vision = _randomize(transformers.CLIPVisionModelWithProjection(vision_config(projection=12)), 5)
    vision.save_pretrained(folder)
    _processor().save_pretrained(folder)
    head = _PublishedHead(12).eval()
    torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    # the documented one-line conversion, run as written
    subprocess.run(AESTHETIC_CONVERSION.replace("python ", f"{sys.executable} ", 1), shell=True, check=True, cwd=tmp_path)
    (tmp_path / AESTHETIC_HEAD).rename(folder / AESTHETIC_HEAD)
    images = _images(3, 24, 4)
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images=_pil(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = vision(pixel_values=pixels).image_embeds
        want = head(emb / emb.norm(dim=-1, keepdim=True))[:, 0].numpy()
    got = make_scorer("aesthetic", str(folder)).score(images)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # a head converted for another CLIP width is refused with the shapes named
    torch.save(_PublishedHead(16).state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    subprocess.run(AESTHETIC_CONVERSION.replace("python ", f"{sys.executable} ", 1), shell=True, check=True, cwd=tmp_path)
    with pytest.raises(ModelError, match=r"layers.0.weight: file has \(1024, 16\), model expects \(1024, 12\)"):
        make_scorer("aesthetic", str(folder), head=str(tmp_path / AESTHETIC_HEAD))


def test_bad_scorer_inputs(tmp_path, clip_folder):
    folder, _ = clip_folder
    with pytest.raises(UserError, match="unknown scorer 'nope'; known: aesthetic, clip_score, pickscore"):
        make_scorer("nope", str(folder))
    with pytest.raises(UserError, match="needs --scorer-path"):
        make_scorer("pickscore", None)
    bare = tmp_path / "noproc"
    bare.mkdir()
    for f in folder.iterdir():
        if f.name not in ("preprocessor_config.json", "processor_config.json") and f.is_file():
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(MissingFileError, match="preprocessor_config.json is missing"):
        make_scorer("clip_score", str(bare))
    vision = tmp_path / "noproj"
    transformers.CLIPVisionModel(vision_config()).save_pretrained(vision)
    _processor().save_pretrained(vision)
    (vision / AESTHETIC_HEAD).write_bytes(b"")
    with pytest.raises(ModelError, match="no visual_projection"):
        make_scorer("aesthetic", str(vision))
    (vision / AESTHETIC_HEAD).unlink()
    with pytest.raises(MissingFileError, match="convert the published head"):
        make_scorer("aesthetic", str(vision))
