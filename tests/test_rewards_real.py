"""
Offline tests of the image rewards in rewards.py (section 2 there).

Every network is a tiny random model (tests/reward_assets.py), written to tmp_path in the format
its real checkpoint has (save_pretrained folders, or torch.save files in the ORIGINAL open_clip /
BLIP key layouts) and loaded back through rewards.py's real loading code.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
import rewards as R  # noqa: E402
from reward_assets import (build_reward_assets, clip_config, hf_to_blip, hf_to_openclip,  # noqa: E402
                           seeded)

PROMPTS = ["a photo of a red dog", "two cats on a sofa"]


def openclip_reference(sd, px, ids, heads=4, patch=32, eos=1):
    """open_clip's CLIP forward, written from the ORIGINAL key layout with torch.nn.functional
    (nn.MultiheadAttention = F.multi_head_attention_forward on seq-first inputs). It checks the
    converter's q/k/v order and transposes against open_clip's math, not just against our inverse."""
    F = torch.nn.functional

    def tower(x, pre, mask):
        n = len({k.split(".")[pre.count(".") + 2] for k in sd if k.startswith(pre + "transformer.resblocks.")})
        for i in range(n):
            b = f"{pre}transformer.resblocks.{i}."
            w = x.shape[-1]
            h = F.layer_norm(x, (w,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"]).transpose(0, 1)
            a, _ = F.multi_head_attention_forward(
                h, h, h, w, heads, sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"], None, None,
                False, 0.0, sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"], training=False,
                need_weights=False, attn_mask=mask)
            x = x + a.transpose(0, 1)
            h = F.layer_norm(x, (w,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"])
            h = F.gelu(F.linear(h, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"]))
            x = x + F.linear(h, sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
        return x

    v = F.conv2d(px, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    v = torch.cat([sd["visual.class_embedding"].expand(len(px), 1, -1), v], 1) + sd["visual.positional_embedding"]
    w = v.shape[-1]
    v = tower(F.layer_norm(v, (w,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"]), "visual.", None)
    img = F.layer_norm(v[:, 0], (w,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    t = tower(t, "", causal)
    t = F.layer_norm(t, (t.shape[-1],), sd["ln_final.weight"], sd["ln_final.bias"])
    # open_clip pools at ids.argmax(-1) = the EOT token, the largest id of the real vocab; our
    # tiny vocab puts EOT at id 1, so pool at its first occurrence instead
    txt = t[torch.arange(len(ids)), (ids == eos).int().argmax(-1)] @ sd["text_projection"]
    return img, txt


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_reward_assets(tmp_path_factory.mktemp("rewards"))


def nets(scorer):
    """The torch modules a scorer holds (after its first call)."""
    out = []
    for attr in ("backbone", "head", "model"):
        m = getattr(scorer, attr, None)
        m = m.model if isinstance(m, R.CLIPBackbone) else m
        if m is not None:
            out.append(m)
    return out


def smooth_image(h=512, w=512, seed=0):
    """A photo-like uint8 image: smooth colour fields + edges + a little noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 6, 6, generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    x = x + 0.3 * ((xx ** 2 + yy ** 2) < 0.3).float() - 0.2 * (xx > 0.5).float()
    x = x + 0.03 * torch.randn(1, 3, h, w, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)[0]


# --- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["clipscore", "pickscore", "aesthetic", "hpsv2", "imagereward"])
def test_make_scorers_finite_differentiable_frozen(assets, name):
    scorer = R.make_scorers([name], assets["sources"])[name]
    assert nets(scorer) == []  # lazy: nothing loaded before the first call
    images = torch.rand(2, 3, 96, 64, requires_grad=True)  # non-square: exercises crop / pad
    out = scorer(images, PROMPTS)
    assert set(out) == {name} and out[name].shape == (2,) and torch.isfinite(out[name]).all()
    out[name].sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    params = [p for m in nets(scorer) for p in m.parameters()]
    assert params and all(not p.requires_grad and p.grad is None for p in params)
    assert all(not m.training for m in nets(scorer))


def test_pickscore_scale(assets):
    scorer = R.make_scorers(["pickscore"], assets["sources"])["pickscore"]
    x = torch.rand(2, 3, 64, 64)
    img, txt = scorer.backbone.embed(x, PROMPTS, scorer.fit, scorer.mode)
    raw = scorer.backbone.model.logit_scale.exp() * (img * txt).sum(-1)
    torch.testing.assert_close(scorer(x, PROMPTS)["pickscore"] * R.PICKSCORE_TABLE_SCALE, raw)


def test_clipscore_and_aesthetic_values_by_hand(assets):
    """CLIPScore = the plain cosine of CLIP's projected embeddings (no 2.5 x max(cos, 0), no x100);
    Aesthetic = its MLP head on the L2-normalised image embedding; each on its own resize."""
    sc = R.make_scorers(["clipscore", "aesthetic"], assets["sources"])
    x = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    clip, aes = sc["clipscore"], sc["aesthetic"]
    m = clip.backbone.load()
    assert aes.backbone is clip.backbone  # one CLIP-L instance
    norm = torch.nn.functional.normalize
    feats = lambda mode: norm(R._pooled(m.get_image_features(  # noqa: E731
        pixel_values=R.preprocess(x, m.config.vision_config.image_size, "crop", mode, "round"))), dim=-1)
    tok = clip.backbone.tokenizer(PROMPTS[:1], padding="max_length", truncation=True, return_tensors="pt",
                                  max_length=m.config.text_config.max_position_embeddings)
    txt = norm(R._pooled(m.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(clip(x, PROMPTS[:1])["clipscore"], (feats("bilinear") * txt).sum(-1))
        got = aes(x)["aesthetic"]
        torch.testing.assert_close(got, aes.head(feats("bicubic")))


def test_make_scorers_missing_checkpoint_message(assets, tmp_path):
    srcs = dict(assets["sources"], hpsv2=str(tmp_path / "nowhere"))
    scorer = R.make_scorers(["hpsv2"], srcs)["hpsv2"]  # building is free ...
    with pytest.raises(FileNotFoundError, match=r"HPS_v2\.1_compressed\.pt.*xswu/HPSv2.*--reward-paths hpsv2=PATH"):
        scorer(torch.rand(1, 3, 32, 32), ["x"])  # ... the error comes at first use
    srcs = dict(assets["sources"], clip_l=str(tmp_path / "no_clip"))
    with pytest.raises(FileNotFoundError, match=r"openai/clip-vit-large-patch14"):
        R.make_scorers(["clipscore"], srcs)["clipscore"](torch.rand(1, 3, 32, 32), ["x"])


def test_reward_paths_option_one_flag_for_every_slot(capsys):
    import argparse
    p = argparse.ArgumentParser()
    R.add_source_args(p)
    args = p.parse_args(["--reward-paths", "clip_l=ckpt/clip, hpsv2-tokenizer=laion/x,hpsv2=a=b.pt"])
    assert R.sources_from_args(args) == {"clip_l": "ckpt/clip", "hpsv2_tokenizer": "laion/x", "hpsv2": "a=b.pt"}
    assert R.sources_from_args(p.parse_args([])) == {}
    for bad in ("clipl=x", "clip_l", "clip_l="):
        with pytest.raises(SystemExit):
            p.parse_args(["--reward-paths", bad])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "not SLOT=PATH" in err and "geneval_detector" in err, err


def test_openclip_to_hf_hpsv2_round_trip(assets):
    n = len(assets["tok"])
    ref = assets["hps"]
    orig = hf_to_openclip(ref.state_dict())
    assert orig["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert orig["visual.proj"].shape == (48, 16)  # used as x @ P in open_clip
    back = seeded(lambda: CLIPModel(clip_config(n)), 99)
    R._load_strict(back, R.openclip_to_hf(orig), "round trip")
    for k, v in ref.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    px, ids = torch.randn(2, 3, 224, 224), torch.tensor([[0, 40, 41, 1, 1], [0, 50, 1, 1, 1]])
    for f in ("get_image_features", "get_text_features"):
        kw = dict(pixel_values=px) if "image" in f else dict(input_ids=ids)
        assert torch.equal(R._pooled(getattr(ref, f)(**kw)), R._pooled(getattr(back, f)(**kw)))
    # the converted model computes what open_clip computes from the original layout
    ref_img, ref_txt = openclip_reference({k: v.float() for k, v in orig.items()}, px, ids)
    torch.testing.assert_close(R._pooled(back.get_image_features(pixel_values=px)), ref_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(R._pooled(back.get_text_features(input_ids=ids)), ref_txt, atol=1e-5, rtol=1e-4)
    # every original key is consumed: an extra one is an error, not silently dropped
    with pytest.raises(ValueError, match="unknown keys"):
        R.openclip_to_hf({**orig, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(48)})
    # and the file written in the fixture loads to the same outputs through load_hpsv2 (fp16 file)
    loaded = R.load_hpsv2(str(assets["dir"] / "hps"), clip_config(n))
    assert torch.allclose(R._pooled(ref.get_image_features(pixel_values=px)),
                          R._pooled(loaded.get_image_features(pixel_values=px)), atol=1e-2)


def test_blip_to_hf_imagereward_round_trip(assets):
    ref = assets["ir"]
    orig = hf_to_blip(ref.state_dict())
    assert "blip.visual_encoder.blocks.1.attn.qkv.weight" in orig and "mlp.layers.7.bias" in orig
    converted = R.blip_to_hf(orig)
    assert set(converted) == set(ref.state_dict())  # nothing dropped, nothing extra
    back = seeded(lambda: R.BlipReward(assets["ir_cfg"]), 99)
    R._load_strict(back, converted, "round trip")
    px = torch.randn(2, 3, 224, 224)
    ids, mask = torch.tensor([[2, 31, 32, 3, 0], [2, 40, 3, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    assert torch.equal(ref(px, ids, mask), back(px, ids, mask))
    with pytest.raises(ValueError, match="unknown keys"):
        R.blip_to_hf({**orig, "blip.text_encoder_m.embeddings.word_embeddings.weight": torch.zeros(1)})
    # the scorer's tokenizer gained [DEC], [ENC] and starts every prompt with [CLS]
    scorer = R.make_scorers(["imagereward"], assets["sources"])["imagereward"]
    scorer.load()
    assert len(scorer.tokenizer) == assets["ir_cfg"].text_config.vocab_size
    assert scorer.tokenizer(["red dog"]).input_ids[0][0] == scorer.tokenizer.cls_token_id


def test_preprocess_matches_pil_processor(assets):
    """Eval path of PickScore / Aesthetic / ImageReward: PIL bicubic shortest side 224, centre crop,
    OpenAI mean/std (CLIPImageProcessor). Ours: torch bicubic + antialias on round(255 x)/255."""
    proc = CLIPImageProcessorPil()  # CLIP defaults = those of every scorer here
    ms = R.MultiReward({"pickscore": 1.0, "clipscore": 1.0}, assets["sources"], quantize=True)
    for h, w in ((512, 512), (512, 384)):
        img = smooth_image(h, w)
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        ref_px = proc(images=pil, return_tensors="pt").pixel_values
        x = img[None].float() / 255
        ours = R.preprocess(x, 224, "crop", "bicubic")
        pix_err = (ours - ref_px).abs().mean().item()
        assert pix_err < 0.02, pix_err  # normalised units (std ~0.27 of [0,1] per unit)
        for name in ("pickscore", "clipscore"):
            bb = ms.scorers[name].backbone
            m = bb.load()
            tok = bb.tokenizer(PROMPTS[:1], padding="max_length", max_length=16, truncation=True,
                               return_tensors="pt")
            txt = torch.nn.functional.normalize(R._pooled(m.get_text_features(**tok)), dim=-1)
            ref_img = torch.nn.functional.normalize(R._pooled(m.get_image_features(pixel_values=ref_px)), dim=-1)
            ref = (ref_img * txt).sum(-1)
            if name == "pickscore":
                ref = m.logit_scale.exp() * ref / R.PICKSCORE_TABLE_SCALE
            got = ms(x, PROMPTS[:1])[name]
            rel = ((got - ref).abs() / ref.abs()).item()
            print(f"{h}x{w} {name}: pixel mean|diff| {pix_err:.4f}, score {ref.item():.5f} vs {got.item():.5f}, rel {rel:.4%}")
            assert rel < 0.01, (name, rel)


def test_preprocess_hpsv2_pad_matches_pil():
    """HPSv2 ResizeMaxSize on PIL: bicubic longest side 224, black padding centred."""
    img = smooth_image(512, 384)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((168, 224), Image.BICUBIC)
    canvas = Image.new("RGB", (224, 224))
    canvas.paste(pil, (28, 0))
    ref = torch.from_numpy(np.array(canvas)).permute(2, 0, 1)[None].float() / 255
    ours = R.preprocess(img[None].float() / 255, 224, "pad", "bicubic")
    mean, std = torch.tensor(R.OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(R.OPENAI_STD).view(1, 3, 1, 1)
    err = (ours * std + mean - ref).abs().mean().item()
    print(f"hpsv2 pad preprocessing: pixel mean|diff| {err:.5f} (of [0,1])")
    assert err < 0.005 and (ours * std + mean)[..., :28].abs().max() < 1e-6


def test_multireward_weighted_sum_quantize_and_sharing(assets):
    weights = {"clipscore": 0.5, "pickscore": 2.0, "hpsv2": -1.0}
    mr = R.MultiReward(weights, assets["sources"])
    x = torch.rand(2, 3, 64, 64)
    out = mr(x, PROMPTS)
    assert set(out) == {"clipscore", "pickscore", "hpsv2", "weighted"}
    c, p, h = (mr.scorers[n](x, PROMPTS)[n] for n in ("clipscore", "pickscore", "hpsv2"))
    torch.testing.assert_close(out["weighted"], 0.5 * c + 2.0 * p - 1.0 * h)
    # quantize=True scores round(255 x)/255 and shares the models of `mr`
    q = R.MultiReward(weights, assets["sources"], quantize=True, share=mr)
    assert q.scorers["hpsv2"] is mr.scorers["hpsv2"]
    xq = R.quantize_uint8(x)
    assert torch.equal(xq * 255, (xq * 255).round())
    torch.testing.assert_close(q(x, PROMPTS)["weighted"], mr(xq, PROMPTS)["weighted"])
    # paper defaults: GRPO {clip, hps, pick} quantised; BP = its differentiable subset, with grad
    grpo, bp = R.training_rewards(assets["sources"])
    assert grpo.quantize and not bp.quantize and set(bp.weights) == {"clipscore", "pickscore", "hpsv2"}
    assert bp.scorers["pickscore"] is grpo.scorers["pickscore"]
    xg = torch.rand(2, 3, 64, 64, requires_grad=True)
    bp(xg, PROMPTS)["weighted"].sum().backward()
    assert xg.grad.abs().sum() > 0
    ev = R.eval_rewards(assets["sources"], share=grpo)
    assert ev.scorers["clipscore"].backbone is ev.scorers["aesthetic"].backbone  # one CLIP-L
    with pytest.raises(NotImplementedError, match="no_such_reward"):
        R.MultiReward({"no_such_reward": 1.0})


def test_hpsv2_clip_config_imagereward_blip_config_match_the_checkpoints():
    """The built-in real-size configs (built on the meta device: no memory, no weights) have the
    shapes of the original checkpoints: open_clip ViT-H-14 (~986M params) and BLIP ViT-L + BERT."""
    with torch.device("meta"):
        hps = CLIPModel(R.hpsv2_clip_config())
        ir = R.BlipReward(R.imagereward_blip_config())
    shapes = {k: tuple(v.shape) for k, v in hps.state_dict().items()}
    assert shapes["vision_model.embeddings.position_embedding.weight"] == (257, 1280)  # 16x16 + CLS
    assert shapes["text_projection.weight"] == (1024, 1024) and shapes["visual_projection.weight"] == (1024, 1280)
    assert 985e6 < sum(p.numel() for p in hps.parameters()) < 987e6
    shapes = {k: tuple(v.shape) for k, v in ir.state_dict().items()}
    assert shapes["vision.embeddings.position_embedding"] == (1, 197, 1024)  # 14x14 + CLS
    assert shapes["text.embeddings.word_embeddings.weight"] == (30524, 768)  # bert + [DEC], [ENC]
    assert shapes["text.encoder.layer.11.crossattention.self.key.weight"] == (768, 1024)
    assert shapes["head.layers.0.weight"] == (1024, 768)


# --- centre crop of an odd margin: each original's rounding ----------------------------------------

def test_crop_offset_round_half_even_and_floor():
    """torchvision's CenterCrop offset is int(round(margin / 2)), Python's round-half-to-even;
    transformers' processors floor. 1000x749 -> shortest side 224 -> 299 wide: margin 75."""
    assert [R.crop_offset(m, "round") for m in (75, 7, 3, 5, 1, 74)] == [38, 4, 2, 2, 0, 37]
    assert [R.crop_offset(m, "floor") for m in (75, 7, 3, 5, 1, 74)] == [37, 3, 1, 2, 0, 37]


def test_preprocess_odd_margin_crop_matches_transformers_floor():
    """A 22 x 29 column ramp at size 22 (no resize; margin 7): "floor" keeps columns 3..24 as
    transformers' center_crop does, "round" columns 4..25 as torchvision's CenterCrop does."""
    from transformers.image_transforms import center_crop
    ramp = torch.arange(29.0).expand(1, 3, 22, 29) / 100
    mean, std = torch.tensor(R.OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(R.OPENAI_STD).view(1, 3, 1, 1)
    cols = {c: (R.preprocess(ramp, 22, "crop", crop=c) * std + mean)[0, 0, 0] * 100 for c in ("floor", "round")}
    ref = center_crop(ramp[0].numpy(), (22, 22), data_format="channels_first")[0, 0] * 100
    assert torch.allclose(cols["floor"], torch.from_numpy(ref), atol=1e-4), "floor crop is not transformers'"
    assert torch.allclose(cols["round"], torch.arange(4.0, 26.0), atol=1e-4), "round crop should start at column 4"


@pytest.mark.parametrize("name,offset", [("imagereward", 38), ("aesthetic", 38), ("clipscore", 38),
                                         ("pickscore", 37)])
def test_scorer_crop_odd_margin_as_original(assets, name, offset):
    """A 224 x 299 image (a 749 x 1000 one after the resize, margin 75): the pixels each scorer's
    vision network receives are columns offset..offset+223, offset 38 where the original pipeline
    uses torchvision's CenterCrop (rounds 37.5) and 37 where it uses transformers' (floors)."""
    scorer = R.make_scorers([name], assets["sources"])[name]
    seen = []

    def look(images):
        scorer(images, PROMPTS[:1])
        return seen.pop()

    with torch.no_grad():
        scorer(torch.rand(1, 3, 224, 224), PROMPTS[:1])  # loads the networks
        vision = scorer.model.vision if name == "imagereward" else scorer.backbone.model.vision_model
        vision.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("pixel_values", a[0] if a else None)),
                                         with_kwargs=True)
        wide = torch.rand(1, 3, 224, 299, generator=torch.Generator().manual_seed(3))
        got = look(wide)
        right, wrong = look(wide[..., offset:offset + 224]), look(wide[..., 75 - offset:75 - offset + 224])
    assert torch.equal(got, right), f"{name} does not crop at column {offset} as its original does"
    assert not torch.allclose(got, wrong), f"{name}: the two offsets should give different pixels"


def torchvision_resize_centercrop(img, size, resample):
    """What the original packages do to a PIL image, written with PIL: torchvision Resize(size)
    (shortest side -> size, long side int(size * long / short), PIL's own antialiased kernel),
    then CenterCrop(size) at offset int(round(margin / 2.0)). Returns float [3, size, size]."""
    w, h = img.size
    nw, nh = (int(size * w / h), size) if h <= w else (size, int(size * h / w))
    img = img.resize((nw, nh), resample)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return torch.from_numpy(np.array(img.crop((left, top, left + size, top + size)))).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("cls,resample", [(R.ImageReward, Image.BICUBIC), (R.Aesthetic, Image.BICUBIC),
                                          (R.CLIPScore, Image.BILINEAR)])
def test_scorer_preprocessing_equals_torchvision_on_an_odd_margin(cls, resample):
    """A 1000 x 749 image (resized to 299 x 224: a 75-pixel margin), smooth and noise: each
    scorer's preprocessing equals its original pipeline's (torchvision Resize + CenterCrop; the
    CLIPScore tensor path resizes bilinear) to within PIL's uint8 rounding, 1/255; a floored crop
    would be off by one column (over 0.02 smooth, 0.2 noise)."""
    yy, xx = torch.meshgrid(torch.arange(749.0), torch.arange(1000.0), indexing="ij")
    smooth = torch.stack([128 + 100 * torch.sin(xx / 37 + c) * torch.cos(yy / 53) for c in range(3)])
    noise = torch.randint(0, 256, (3, 749, 1000), generator=torch.Generator().manual_seed(0)).float()
    mean, std = torch.tensor(R.OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(R.OPENAI_STD).view(1, 3, 1, 1)
    for img, floor_err in ((smooth, 0.02), (noise, 0.2)):
        u8 = img.round().clamp(0, 255).to(torch.uint8)
        ref = torchvision_resize_centercrop(Image.fromarray(u8.permute(1, 2, 0).numpy()), 224, resample)
        x = u8[None].float() / 255
        ours = R.preprocess(x, 224, cls.fit, cls.mode, cls.crop) * std + mean
        floored = R.preprocess(x, 224, cls.fit, cls.mode, "floor") * std + mean
        err = (ours[0] - ref).abs().max().item()
        print(f"{cls.name}: max |ours - torchvision| {err:.4f}, floored crop {(floored[0] - ref).abs().max():.4f}")
        assert err < 1.5 / 255, err
        assert (floored[0] - ref).abs().max() > floor_err
