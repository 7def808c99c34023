"""SANA prompt encoding against diffusers' `SanaPipeline.encode_prompt` on a tiny pipeline built offline: a
Gemma tokenizer made with the `tokenizers` library, a random tiny Gemma-2, the complex human instruction, the
kept positions (BOS + the last max_sequence_length - 1) and the negative prompt without the instruction."""

import numpy as np
import pytest

from ddspo_jax.backbones.sana import COMPLEX_HUMAN_INSTRUCTION, SanaPromptEncoder, load_gemma_tokenizer
from ddspo_jax.convert import load_gemma2


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    import torch
    import transformers
    from diffusers import (AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline,
                           SanaTransformer2DModel)
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    root = tmp_path_factory.mktemp("sana_text")
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,:;'-> \n") - {" "})
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "▁": 5}
    for ch in chars:
        vocab[ch] = len(vocab)
    merges = [("▁", "a"), ("▁", "c")]
    vocab.update({"▁a": len(vocab), "▁c": len(vocab) + 1})
    tok = GemmaTokenizer(vocab=vocab, merges=merges)
    tok.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=len(vocab), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                    query_pre_attn_scalar=8, sliding_window=64, pad_token_id=0)
    enc = transformers.Gemma2Model(cfg).eval()
    enc.save_pretrained(root / "text_encoder", safe_serialization=True)
    vae = AutoencoderDC(latent_channels=4, encoder_block_out_channels=[8, 8], decoder_block_out_channels=[8, 8],
                        encoder_layers_per_block=[1, 1], decoder_layers_per_block=[1, 1],
                        encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                        encoder_qkv_multiscales=[[], []], decoder_qkv_multiscales=[[], []])
    tr = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4,
                                num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                cross_attention_dim=8, caption_channels=16, sample_size=4)
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    pipe = SanaPipeline(tokenizer=transformers.AutoTokenizer.from_pretrained(root / "tokenizer"), text_encoder=enc,
                        vae=vae, transformer=tr, scheduler=sched)
    return pipe, root


@pytest.mark.parametrize("max_len", [12, 40])
def test_encode_prompt_matches_sana_pipeline(pipeline, max_len):
    import torch

    pipe, root = pipeline
    prompts = ["A cat on a mat", "  Three RED circles, left of a blue square; a very long prompt " * 3]
    with torch.no_grad():
        pe, pm, ne, nm = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt="",
                                            max_sequence_length=max_len,
                                            complex_human_instruction=list(COMPLEX_HUMAN_INSTRUCTION))
    model, params = load_gemma2(root / "text_encoder", dtype=np.float32, param_dtype=np.float32)
    ours = SanaPromptEncoder(load_gemma_tokenizer(root / "tokenizer"), model, params, max_sequence_length=max_len)
    got, neg = ours.encode(prompts), ours.encode_negative(2)
    assert got["prompt_embeds"].shape == tuple(pe.shape) and got["prompt_embeds"].shape[1] == max_len
    np.testing.assert_array_equal(got["prompt_attention_mask"], pm.numpy())
    np.testing.assert_array_equal(neg["prompt_attention_mask"], nm.numpy())
    for a, b in ((got["prompt_embeds"], pe.numpy()), (neg["prompt_embeds"], ne.numpy())):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), np.abs(a - b).max()


def test_missing_tokenizer_is_named(tmp_path):
    from ddspo_jax.convert.common import ConversionError

    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(ConversionError, match="no usable Gemma tokenizer"):
        load_gemma_tokenizer(tmp_path / "tokenizer")
