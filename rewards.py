"""
rewards.py -- r(samples, prompts): what stage 2 maximises.

Every reward is a callable  reward(samples, prompts) -> {name: Tensor[B]}, differentiable in `samples` where the
method back-propagates through it (subgrpo.py, section 2). "Official code" is github.com/Harahan/RTDMD (README);
its scorers are in rtdmd/rewards/*.py.

1. Toy rewards of a 2-D point, each with its exact reward-tilted mixture
   A linear r = a^T x or a quadratic r = -(gamma/2)|x - m|^2 tilts each Gaussian component of the toy mixture
   (models.py, section 2) into another Gaussian, so p~ is a mixture again, in closed form (derivation at the code).

2. Image rewards: CLIPScore, PickScore, Aesthetic, HPSv2.1, ImageReward; GenEval, OCR, HPSv3, GenEval2
   Inputs: float images [B, 3, H, W] in [0, 1], the VAE decode (x/2 + 0.5).clamp(0, 1). Evaluation and GRPO score
   the 8-bit image round(255 x)/255 (rtdmd/rewards/multi_scorer.py); reward back-prop scores the float image with
   its gradient (rtdmd/trainers/bp_mixin.py). The first five preprocess in torch (F.interpolate with antialias,
   crop by slicing, the OpenAI CLIP mean/std they all use), so every score is differentiable; PIL's processors
   differ by < 1%.

       scorer       network (hub id)                         preprocessing                  score
       clipscore    CLIP ViT-L/14 (openai/clip-vit-large-    shortest side 224 (bilinear),  cosine, ~0.3
                    patch14)                                 centre crop
       pickscore    PickScore_v1, a CLIP ViT-H/14            shortest side 224 (bicubic),   logit_scale cos
                    (yuvalkirstain/PickScore_v1)             centre crop                    / 26 (~0.9)
       aesthetic    LAION MLP head on the normalised         as clipscore (bicubic)         ~5-6 (AVA)
                    CLIP-L/14 image embedding
       hpsv2        HPSv2.1, open_clip ViT-H/14 (xswu/HPSv2) longest side 224 (bicubic),    cosine (~0.3)
                                                             zero-pad to a square
       imagereward  ImageReward v1.0, BLIP ViT-L/16 + BERT   shortest side 224 (bicubic),   (raw - 0.16717)
                    with cross-attention (THUDM/ImageReward) centre crop; text <= 35 tokens / 1.03334

   PickScore's logit scale is exp(4.6) ~ 100: its raw score ~22-24 is what the paper's tables report; the official
   code trains and logs PickScore / 26 so the three training rewards have similar scales (PICKSCORE_TABLE_SCALE).
   HPSv2.1 and ImageReward exist only in their open_clip / BLIP layouts and are converted key by key
   (`openclip_to_hf`, `blip_to_hf`). The paper's other metrics have no gradient (GRPO and evaluation only) and take
   their inputs from the transformers processors: GenEval (Mask2Former objects + CLIP colours), OCR (Florence-2),
   HPSv3 (Qwen2-VL) and GenEval2 (Qwen3-VL); each section's comment says what it scores and how it differs from the
   official rtdmd/rewards/{geneval,ocr,hpsv3,geneval2}_scorer.py.

3. The weighted multi-reward
   GRPO weights (configs/rtdmd/*.yaml): clipscore, hpsv2, pickscore, geneval 1 each; advantages are per reward
   (subgrpo.py, section 5). Reward back-prop uses the differentiable subset of the same rewards with the same
   weights. Evaluation reports every metric with weight 1.
"""
import torch

import models

# ---------------------------------------------------------------------------------------------
# 1. Toy rewards and their exact tilts
# ---------------------------------------------------------------------------------------------

# The toy world's "images" are 2-D points x [B, 2] (ToyBackbone.decode is the identity). Both rewards ignore the
# prompt, are differentiable in x, and tilt an isotropic mixture
#     p(x|c) = sum_j pi_cj N(x; mu_j, s_j^2 I)
# into another isotropic mixture, in closed form, because a Gaussian times exp(linear or quadratic) is again a
# Gaussian times a constant:
#     N(x; mu_j, s_j^2 I) exp(beta r(x)) = f_j  N(x; mu~_j, s~_j^2 I),
# so  p~(x|c) = p(x|c) exp(beta r(x)) / Z_beta(c)  has weights  pi~_cj = pi_cj f_j / Z_beta(c),  with
# Z_beta(c) = sum_j pi_cj f_j.  Every row of the weight table is tilted this way, the null row "" included: its
# tilt is the tilt of p(x|null), which in general is *not* the mean of the tilted conditional rows (irrelevant
# for the exactness checks, which use g = 1).


def tilted_weights(weights, log_f):
    """pi~_cj = pi_cj f_j / sum_j' pi_cj' f_j'  for every row c. weights [C, J], log_f [J]."""
    return torch.softmax(torch.log(weights) + log_f[None], dim=1)


def tilt_linear(mixture, a, beta):
    """Exact tilt of an isotropic mixture by exp(beta a^T x) (section 1):
        mu~_j = mu_j + beta s_j^2 a,   s~_j = s_j,
        log f_j = beta a^T mu_j + 1/2 beta^2 s_j^2 |a|^2.
    Returns a new models.Mixture (weights [C, J], one row per condition, null row included)."""
    # --- exercise tilt_linear: begin ---
    a = torch.as_tensor(a, dtype=torch.float64)
    s2 = mixture.stds ** 2
    log_f = beta * mixture.means @ a + 0.5 * beta ** 2 * s2 * (a @ a)
    means = mixture.means + beta * s2[:, None] * a[None]
    return models.Mixture(means, mixture.stds.clone(), tilted_weights(mixture.weights, log_f))
    # --- exercise tilt_linear: end ---


def quadratic_log_f(mixture, gamma, m, beta):
    """log f_j for r = -(gamma/2)|x - m|^2, up to a j-independent constant, with bg = beta gamma:
        f_j  prop. to  N(mu_j; m, (s_j^2 + 1/bg) I)
             = (1 + bg s_j^2)^(-d/2) exp(-bg |mu_j - m|^2 / (2 (1 + bg s_j^2))) * const.
    The second form is exactly E_{N(mu_j, s_j^2)}[exp(beta r)] (so sum_j pi_cj f_j = Z_beta(c)), finite at beta = 0."""
    m = torch.as_tensor(m, dtype=torch.float64)
    bg, s2 = beta * gamma, mixture.stds ** 2
    assert bool((1 + bg * s2 > 0).all()), "beta * gamma too negative: the tilt is not normalisable"
    dist2 = ((mixture.means - m) ** 2).sum(1)
    return -0.5 * mixture.means.shape[1] * torch.log1p(bg * s2) - bg * dist2 / (2 * (1 + bg * s2))


def tilt_quadratic(mixture, gamma, m, beta):
    """Exact tilt of an isotropic mixture by exp(-beta gamma/2 |x - m|^2) (section 1):
        precision 1/s~_j^2 = 1/s_j^2 + beta gamma,   i.e. s~_j^2 = s_j^2 / (1 + beta gamma s_j^2),
        mu~_j = (mu_j / s_j^2 + beta gamma m) / (1/s_j^2 + beta gamma),
        pi~_cj prop. to pi_cj N(mu_j; m, (s_j^2 + 1/(beta gamma)) I)    (quadratic_log_f).
    Returns a new models.Mixture."""
    m = torch.as_tensor(m, dtype=torch.float64)
    bg, s2 = beta * gamma, mixture.stds ** 2
    prec = 1 / s2 + bg
    means = (mixture.means / s2[:, None] + bg * m[None]) / prec[:, None]
    log_f = quadratic_log_f(mixture, gamma, m, beta)
    return models.Mixture(means, (1 / prec).sqrt(), tilted_weights(mixture.weights, log_f))


class ToyReward:
    """Either toy reward; a subclass gives r, its tilt, its log f_j and E_{p(x|c)}[r] in closed form."""

    def log_partition(self, mixture, beta):
        """log Z_beta(c) = log E_{p(x|c)}[exp(beta r)] = logsumexp_j(log pi_cj + log f_j), [C]."""
        return torch.logsumexp(torch.log(mixture.weights) + self.log_f(mixture, beta)[None], dim=1)


class LinearReward(ToyReward):
    """r(x) = a^T x. Callable (samples [B, d], prompts) -> {name: Tensor[B]}, differentiable."""

    def __init__(self, a=(1.0, 0.0), name="linear"):
        self.a, self.name = torch.as_tensor(a, dtype=torch.float64), name

    def __call__(self, samples, prompts=None):
        return {self.name: samples @ self.a.to(samples)}

    def tilt(self, mixture, beta):
        """The exact tilted mixture p(x|c) exp(beta r(x)) / Z_beta(c)."""
        return tilt_linear(mixture, self.a, beta)

    def log_f(self, mixture, beta):
        return beta * mixture.means @ self.a + 0.5 * beta ** 2 * mixture.stds ** 2 * (self.a @ self.a)

    def exact_mean(self, mixture):
        """E_{p(x|c)}[r] = sum_j pi_cj a^T mu_j, Tensor[C] (float64)."""
        return mixture.weights @ (mixture.means @ self.a)


class QuadraticReward(ToyReward):
    """r(x) = -(gamma/2) |x - m|^2. Callable (samples [B, d], prompts) -> {name: Tensor[B]}."""

    def __init__(self, gamma=1.0, m=(2.0, 0.0), name="quadratic"):
        self.gamma, self.m, self.name = float(gamma), torch.as_tensor(m, dtype=torch.float64), name

    def __call__(self, samples, prompts=None):
        return {self.name: -0.5 * self.gamma * ((samples - self.m.to(samples)) ** 2).sum(1)}

    def tilt(self, mixture, beta):
        return tilt_quadratic(mixture, self.gamma, self.m, beta)

    def log_f(self, mixture, beta):
        return quadratic_log_f(mixture, self.gamma, self.m, beta)

    def exact_mean(self, mixture):
        """E_{p(x|c)}[r] = -(gamma/2) sum_j pi_cj (|mu_j - m|^2 + d s_j^2), Tensor[C]."""
        per_j = ((mixture.means - self.m) ** 2).sum(1) + mixture.means.shape[1] * mixture.stds ** 2
        return -0.5 * self.gamma * mixture.weights @ per_j


def toy_reward(name="quadratic"):
    """The toy's stage-2 reward (train.py --reward quadratic|linear; eval.py too): a bowl at the ring mode (2, 0),
    or the linear reward along the first axis."""
    return QuadraticReward(1.0, (2.0, 0.0)) if name == "quadratic" else LinearReward((1.0, 0.0))

# ---------------------------------------------------------------------------------------------
# 2. Image rewards
# ---------------------------------------------------------------------------------------------

# scorer(images, prompts) -> {scorer.name: Tensor[B]}; image i is scored against prompts[i] only (pairs, never
# ImageReward's all-images-x-all-prompts `inference_rank`). Networks are frozen, in eval mode, and load on first
# use, so the generator is all reward back-prop can move and a run never loads a checkpoint it does not score
# with. `sources` maps a slot to a hub id or a local path (DEFAULT_SOURCES); a key a checkpoint converter does not
# know is an error, never dropped. GenEval and GenEval2 also take each prompt's .jsonl record:
# scorer(images, prompts, metadata). Imports live here so the toy section stays light; transformers is imported
# inside the loaders.
import math
import os
import re

import torch.nn as nn
import torch.nn.functional as F

from sample import to_pil  # the 8-bit PIL images the no-gradient scorers' processors take

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP normalisation, used by all 5 scorers
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PICKSCORE_TABLE_SCALE = 26.0  # RTDMD trains on PickScore/26; paper tables report PickScore raw
# ImageReward's z-score of its raw head output: the image-reward package's constants, which
# rtdmd/rewards/imagereward_scorer.py uses through that package
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.033339496605407

# slot -> hub id or local path; a raw-file slot may also be a local file or a folder holding it. A "*_config"
# slot may be a transformers config object (tests use tiny ones); None = real size.
DEFAULT_SOURCES = {
    "clip_l": "openai/clip-vit-large-patch14",  # CLIPScore + Aesthetic backbone (shared)
    "pickscore": "yuvalkirstain/PickScore_v1",
    "pickscore_tokenizer": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",  # PickScore's processor
    "aesthetic_head": "trl-lib/ddpo-aesthetic-predictor",  # or the .pth file itself
    "hpsv2": "xswu/HPSv2",  # holds HPS_v2.1_compressed.pt
    "hpsv2_tokenizer": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "hpsv2_config": None,  # same BPE as open_clip
    "imagereward": "THUDM/ImageReward",  # holds ImageReward.pt
    "imagereward_tokenizer": "google-bert/bert-base-uncased", "imagereward_config": None,
    "geneval_detector": "facebook/mask2former-swin-small-coco-instance",  # colours: clip_l
    "ocr": "florence-community/Florence-2-base",  # model and its Florence2Processor
    "hpsv3": "MizzenAI/HPSv3",  # holds HPSv3.safetensors
    "hpsv3_base": "Qwen/Qwen2-VL-7B-Instruct", "hpsv3_config": None,  # its config and tokenizer
    "hpsv3_template": None,  # the hpsv3 package (installed, its .whl, or data_collator_qwen.py)
    "geneval2": "Qwen/Qwen3-VL-8B-Instruct",  # Soft-TIFA's question answerer
}


def quantize_uint8(images):
    """round(255 x) / 255, the 8-bit image eval and GRPO score (section 2). Zero gradient: never on the BP path."""
    return torch.round(images.clamp(0, 1) * 255) / 255


# reward -> (field its prompt records must hold, the official prompt file that has it)
METADATA_FIELDS = {"geneval": ("include", "dataset/geneval/train_metadata.jsonl"),
                   "geneval2": ("vqa_list", "dataset/geneval2/test.jsonl")}


def check_metadata(names, records, n=None, where="the records given",
                   fix="read them from its .jsonl (the official {official})"):
    """One-line ValueError unless `records` (a .jsonl file's records, n if given) hold the METADATA_FIELDS field of
    each reward of `names` that reads one; `fix` ({name}, {official}) says what to do. Used by train.py, eval.py."""
    for name in filter(METADATA_FIELDS.__contains__, names):
        field, official = METADATA_FIELDS[name]
        if not records or (n is not None and len(records) != n) or not all(
                isinstance(r, dict) and field in r for r in records):
            raise ValueError(f"{name} needs one {'GenEval2' if name == 'geneval2' else 'GenEval'} metadata record "
                             f"with '{field}' per prompt, not found in {where}: "
                             + fix.format(name=name, official=official))


def crop_offset(margin, rounding):
    """Top (or left) offset of a centred crop that leaves `margin` pixels out.
    "round": torchvision's CenterCrop, int(round(margin / 2)) with Python's round-half-to-even (margin 75 -> 38,
             3 -> 2, 1 -> 0); the original ImageReward, LAION aesthetic and CLIPScore pipelines crop this way.
    "floor": transformers' image processors, margin // 2 (75 -> 37): PickScore's CLIP processor."""
    return int(round(margin / 2.0)) if rounding == "round" else margin // 2


def normalise(x, mean, std):
    """(x - mean) / std per channel of [B, 3, H, W]."""
    return (x - x.new_tensor(mean).view(1, 3, 1, 1)) / x.new_tensor(std).view(1, 3, 1, 1)


def preprocess(images, size=224, fit="crop", mode="bicubic", crop="floor"):
    """[B,3,H,W] in [0,1] -> normalised [B,3,size,size], differentiable (section 2).
    fit="crop": shortest side -> size, then centre crop (CLIP processor; torchvision Resize + CenterCrop in RTDMD's
                tensor path); `crop`: crop_offset's rounding of an odd margin (1 px, ~1e-2 on a 1000x749 image).
    fit="pad":  longest side -> size, then zero-pad to a centred square (HPSv2 "ResizeMaxSize")."""
    h, w = images.shape[-2:]
    if fit == "crop":  # long side truncated with int(), as both the HF processor and torchvision do
        nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    else:
        nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    x = images
    if (nh, nw) != (h, w):
        # antialias=True: PIL always low-pass filters when it shrinks (512 -> 224); without it the kernel aliases
        # and scores drift. clamp: PIL's uint8 output cannot overshoot [0,1] the way a bicubic kernel does (this
        # zeroes the gradient only of saturated pixels).
        x = F.interpolate(x, size=(nh, nw), mode=mode, antialias=True, align_corners=False).clamp(0, 1)
    if fit == "crop":
        top, left = crop_offset(nh - size, crop), crop_offset(nw - size, crop)
        x = x[..., top:top + size, left:left + size]
    else:  # pad with black *before* normalising, as HPSv2 pads the PIL image
        ph, pw = size - nh, size - nw
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    return normalise(x, OPENAI_MEAN, OPENAI_STD)


# --- loading helpers ---------------------------------------------------------------------------

class Lazy:
    """A scorer part whose network, `build()`, loads on first use and follows the images' device (a no-op once it
    is there). Frozen: eval() turns dropout off, requires_grad_(False) keeps every scorer weight out of autograd."""
    model = None

    def load(self, device=None):
        if self.model is None:
            self.model = self.build().eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        return self.model


def _not_found(what, src, slot):
    return FileNotFoundError(f"{what} not found at {src!r}; download it from the hub repo {DEFAULT_SOURCES[slot]} "
                             f"and pass its path as sources['{slot}'] (--reward-paths {slot}=PATH)")


def _pretrained(cls, src, slot, what):
    """cls.from_pretrained for a hub id or a local folder, with one clear error line."""
    try:
        return cls.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise _not_found(what, src, slot) from e


def _checkpoint(src, filenames, slot, what):
    """(path, state dict) of a raw checkpoint: `src` the file, a folder holding it, or a hub id. torch.load with
    weights_only=True (data, never code), unwrapping {'state_dict': ...}; a .safetensors file through safetensors."""
    candidates = (src, *(os.path.join(src, n) for n in filenames))
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None and not os.path.exists(src):  # a hub id? (HF_HUB_OFFLINE=1: the cache only)
        from huggingface_hub import hf_hub_download
        for name in filenames:
            try:
                path = hf_hub_download(src, name)
                break
            except Exception:
                pass
    if path is None:
        raise _not_found(f"{what} '{filenames[0]}'", src, slot)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return path, load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return path, sd.get("state_dict", sd)


def _load_strict(net, sd, what):
    """load_state_dict that allows only the non-persistent position_ids buffers to be missing."""
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{what}: missing {missing[:6]}, unexpected {unexpected[:6]}")
    return net


def _config(cls, config, default):
    """None -> the real-size default; a str -> cls.from_pretrained (hub id or folder); else as is."""
    if config is None:
        return default()
    return cls.from_pretrained(config) if isinstance(config, str) else config


def _pooled(out):
    """transformers 5 get_*_features return an output object; the projection is .pooler_output."""
    return out if torch.is_tensor(out) else out.pooler_output


class MLPHead(nn.Module):
    """768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropouts, NO activations: the LAION aesthetic and ImageReward heads (keys
    layers.{0,2,4,6,7}). In eval mode one affine map; the layers are kept so the checkpoints load as is."""

    def __init__(self, in_dim=768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x).squeeze(-1)


# --- CLIP-family scorers: CLIPScore, PickScore, Aesthetic, HPSv2.1 ------------------------------

class CLIPBackbone(Lazy):
    """A frozen CLIPModel + tokenizer, loaded on first use: one CLIP-L/14 shared by CLIPScore and Aesthetic, a ViT-H/14
    each for PickScore and HPSv2.1. `make` builds the model instead of from_pretrained (HPSv2.1's converted weights)."""

    def __init__(self, model_src, tokenizer_src=None, slot="clip_l", make=None):
        self.model_src, self.tokenizer_src, self.slot, self.make = model_src, tokenizer_src, slot, make

    def build(self):
        from transformers import AutoTokenizer, CLIPModel
        model = self.make() if self.make else _pretrained(CLIPModel, self.model_src, self.slot, "CLIP model")
        tok_src = self.tokenizer_src or self.model_src
        tok_slot = self.slot + "_tokenizer" if self.tokenizer_src else self.slot
        self.tokenizer = _pretrained(AutoTokenizer, tok_src, tok_slot, "CLIP tokenizer")
        return model

    def embed(self, images, prompts, fit="crop", mode="bicubic", crop="floor"):
        """L2-normalised projected (image [B,D], text [B,D]) embeddings; text None if no prompts."""
        m = self.load(images.device)
        px = preprocess(images, m.config.vision_config.image_size, fit, mode, crop).to(m.dtype)
        img = F.normalize(_pooled(m.get_image_features(pixel_values=px)).float(), dim=-1)
        return img, None if prompts is None else self.embed_text(prompts, images.device)

    def embed_text(self, texts, device):
        """L2-normalised projected text embeddings [B, D]. CLIP text attention is causal and pooled at the EOS
        token, so pads after it never matter: "max_length" (RTDMD CLIPScore, open_clip) == padding=True (PickScore)."""
        m = self.load(device)
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt",
                             max_length=m.config.text_config.max_position_embeddings).to(device)
        txt = m.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        return F.normalize(_pooled(txt).float(), dim=-1)


class CLIPScore:
    """Cosine of CLIP-L/14's projected embeddings (= logits_per_image / 100, no 2.5*max(cos,0) of the CLIPScore paper).
    bilinear, crop round: torchvision Resize + CenterCrop of rtdmd/rewards/clip_scorer.py's tensor path (eval, BP)."""
    name, fit, mode, crop = "clipscore", "crop", "bilinear", "round"

    def __init__(self, backbone):
        self.backbone = backbone

    def cosine(self, images, prompts):
        img, txt = self.backbone.embed(images, prompts, self.fit, self.mode, self.crop)
        return (img * txt).sum(-1)

    def __call__(self, images, prompts):
        return {self.name: self.cosine(images, prompts)}


class PickScore(CLIPScore):
    """logit_scale.exp() * cos on PickScore_v1 (the paper's table value) DIVIDED BY 26, as RTDMD trains and logs it.
    bicubic, crop floor: its eval numbers come from the PIL CLIP processor (RTDMD's BP path: bilinear, < 1% apart)."""
    name, mode, crop = "pickscore", "bicubic", "floor"

    def __call__(self, images, prompts):
        cos = self.cosine(images, prompts)
        return {self.name: self.backbone.model.logit_scale.exp() * cos / PICKSCORE_TABLE_SCALE}


class HPSv2(CLIPScore):
    """Section 2: HPSv2.1 = cosine (no logit scale) of an open_clip ViT-H/14 fine-tune."""
    name, fit, mode = "hpsv2", "pad", "bicubic"


class Aesthetic:
    """LAION aesthetic v2 = MLPHead(L2-normalised CLIP-L/14 image embedding), prompt ignored; a no-grad metric in
    RTDMD, differentiable here. crop round: the original predictor uses OpenAI CLIP's torchvision CenterCrop."""
    name, fit, mode, crop = "aesthetic", "crop", "bicubic", "round"
    FILES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic-model.pth")  # original, trl mirror name

    def __init__(self, backbone, head_src):
        self.backbone, self.head_src, self.head = backbone, head_src, None

    def __call__(self, images, prompts=None):
        img, _ = self.backbone.embed(images, None, self.fit, self.mode, self.crop)
        if self.head is None:
            path, sd = _checkpoint(self.head_src, self.FILES, "aesthetic_head", "LAION aesthetic head")
            head = _load_strict(MLPHead(sd["layers.0.weight"].shape[1]), sd, path)
            self.head = head.eval().requires_grad_(False)  # frozen, as Lazy
        return {self.name: self.head.to(img.device)(img)}


# --- HPSv2.1: open_clip ViT-H/14 -> transformers CLIPModel ---------------------------------------

def hpsv2_clip_config():
    """open_clip ViT-H-14 as a CLIPConfig (= laion/CLIP-ViT-H-14's config.json)."""
    from transformers import CLIPConfig
    return CLIPConfig(projection_dim=1024, text_config=dict(
        hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
        max_position_embeddings=77, vocab_size=49408, hidden_act="gelu"), vision_config=dict(
        hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
        patch_size=14, image_size=224, hidden_act="gelu"))


_OC_TOP = {  # open_clip name -> HF name, copied unchanged
    "logit_scale": "logit_scale",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic, HF's spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
# open_clip projects with `x @ P`; nn.Linear computes x @ W.T, so W = P transposed.
_OC_PROJ = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_OC_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def _convert(sd, rename, what, prefixes=("module.",)):
    """sd renamed key by key: rename(key less `prefixes`, tensor) -> {new key: tensor}, {} to drop it, or None for a
    key it does not know, an error (never dropped)."""
    out, unknown = {}, []
    for k, v in sd.items():
        for p in prefixes:
            k = k.removeprefix(p)
        new = rename(k, v)
        if new is None:
            unknown.append(k)
        else:
            out.update(new)
    if unknown:
        raise ValueError(f"{what}: {len(unknown)} unknown keys, e.g. {unknown[:6]}")
    return out


def openclip_to_hf(sd):
    """open_clip CLIP state dict -> transformers CLIPModel state dict. Raises on unknown keys."""
    def rename(k, v):
        block = re.match(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        fused = re.match(r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", k)
        if k in _OC_TOP:
            return {_OC_TOP[k]: v}
        if k in _OC_PROJ:
            return {_OC_PROJ[k]: v.t().contiguous()}
        if fused:  # one fused [3D, ...] in-projection, rows ordered q, k, v -> three Linears
            pre = f"{'vision' if fused[1] else 'text'}_model.encoder.layers.{fused[2]}.self_attn."
            return {f"{pre}{n}_proj.{fused[3]}": p.contiguous() for n, p in zip("qkv", v.chunk(3, dim=0))}
        if block and block[3] in _OC_BLOCK:
            tower = "vision" if block[1] else "text"
            return {f"{tower}_model.encoder.layers.{block[2]}.{_OC_BLOCK[block[3]]}.{block[4]}": v}
        return {} if k.endswith("attn_mask") else None  # the causal-mask buffer: HF builds its own
    return _convert(sd, rename, "openclip_to_hf")


def load_hpsv2(src, config=None):
    """HPSv2.1 as a frozen transformers CLIPModel (fp16 in the file, loaded as fp32). The HPS file holds the whole
    model, so the laion base weights the official code builds first are not needed (rtdmd/rewards/hpsv2_scorer.py)."""
    from transformers import CLIPConfig, CLIPModel
    path, sd = _checkpoint(src, ("HPS_v2.1_compressed.pt",), "hpsv2", "HPSv2.1 checkpoint")
    return _load_strict(CLIPModel(_config(CLIPConfig, config, hpsv2_clip_config)), openclip_to_hf(sd), path)


# --- ImageReward: BLIP -> transformers BlipVisionModel + BlipTextModel ---------------------------

def imagereward_blip_config():
    """BLIP ViT-L/16 + BERT-base 'med' text encoder cross-attending to the 1024-d image tokens (BlipConfig copies
    vision hidden_size into text encoder_hidden_size)."""
    from transformers import BlipConfig
    return BlipConfig(vision_config=dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=16, layer_norm_eps=1e-6), text_config=dict(
        vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=512, layer_norm_eps=1e-12))


class BlipReward(nn.Module):
    """ImageReward: image tokens -> text encoder cross-attends -> [CLS] -> MLP -> z-score. BLIP's ITC heads
    (vision_proj, text_proj) are not used."""

    def __init__(self, config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel
        self.vision = BlipVisionModel(config.vision_config)
        self.text = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.head = MLPHead(config.text_config.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask):
        # HF's last_hidden_state is post-layernormed: the same final norm BLIP's ViT applies
        tokens = self.vision(pixel_values=pixel_values).last_hidden_state
        # is_decoder=False: bidirectional self-attention (BLIP "multimodal" mode); no encoder mask = every image
        # token visible (ImageReward passes an all-ones mask)
        h = self.text(input_ids=input_ids, attention_mask=attention_mask,
                      encoder_hidden_states=tokens, is_decoder=False).last_hidden_state
        return (self.head(h[:, 0]) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


_BLIP_TOP = {  # original name (after "blip.") -> BlipReward name
    "visual_encoder.cls_token": "vision.embeddings.class_embedding",  # [1,1,D] both sides
    "visual_encoder.pos_embed": "vision.embeddings.position_embedding",  # [1,197,D] both sides
    "visual_encoder.patch_embed.proj.weight": "vision.embeddings.patch_embedding.weight",
    "visual_encoder.patch_embed.proj.bias": "vision.embeddings.patch_embedding.bias",
    "visual_encoder.norm.weight": "vision.post_layernorm.weight",
    "visual_encoder.norm.bias": "vision.post_layernorm.bias",
}
# timm block names -> HF BLIP; qkv stays one fused Linear with the same (3, heads, dim) order
_BLIP_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
               "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def blip_to_hf(sd):
    """ImageReward.pt state dict -> BlipReward state dict. Raises on unknown keys."""
    def rename(k, v):
        block = re.match(r"visual_encoder\.blocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        if k in _BLIP_TOP:
            return {_BLIP_TOP[k]: v}
        if block and block[2] in _BLIP_BLOCK:
            return {f"vision.encoder.layers.{block[1]}.{_BLIP_BLOCK[block[2]]}.{block[3]}": v}
        if k.endswith("position_ids") or k.startswith(("vision_proj.", "text_proj.")):
            return {}  # a buffer HF rebuilds, and BLIP's contrastive heads the reward never uses
        if k.startswith("text_encoder."):  # HF's BlipTextModel is a port of BLIP's med.py: same names
            return {"text." + k.removeprefix("text_encoder."): v}
        if k.startswith("mlp.layers."):
            return {"head." + k.removeprefix("mlp."): v}
        return None
    return _convert(sd, rename, "blip_to_hf", ("module.", "blip."))


class ImageReward(Lazy):
    """ImageReward v1.0, a z-scored preference score (paper 0.78-1.37). Text: bert-base-uncased + [DEC],
    [ENC], max 35 tokens, [CLS] first. Image: as its PIL eval path, `crop` round its torchvision CenterCrop (RTDMD's
    BP fallback squashed to 224x224 without antialias instead; identical for square images up to antialias)."""
    name, fit, mode, crop = "imagereward", "crop", "bicubic", "round"

    def __init__(self, src, tokenizer_src, config=None):
        self.src, self.tokenizer_src, self.config = src, tokenizer_src, config

    def build(self):
        from transformers import AutoTokenizer, BlipConfig
        path, sd = _checkpoint(self.src, ("ImageReward.pt",), "imagereward", "ImageReward checkpoint")
        net = BlipReward(_config(BlipConfig, self.config, imagereward_blip_config))
        tok = _pretrained(AutoTokenizer, self.tokenizer_src, "imagereward_tokenizer", "BERT tokenizer")
        tok.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's init_tokenizer: the two extra
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})  # ids 30522, 30523
        self.tokenizer = tok
        return _load_strict(net, blip_to_hf(sd), path)

    def __call__(self, images, prompts):
        net = self.load(images.device)
        px = preprocess(images, net.vision.config.image_size, self.fit, self.mode, self.crop)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt",
                             max_length=min(35, net.text.config.max_position_embeddings)).to(images.device)
        return {self.name: net(px.to(net.head.layers[0].weight.dtype), tok.input_ids, tok.attention_mask)}

# --- GenEval: Mask2Former instance segmentation + CLIP colour, then the GenEval rules ----------
# The official scorer (rtdmd/rewards/geneval_scorer.py) runs mmdet's Mask2Former Swin-S (COCO instance
# segmentation) and open_clip ViT-L/14 (openai weights) for colours. Here: the Mask2Former authors' own Swin-S COCO
# model in transformers (same architecture and data, trained separately with Detectron2, so a borderline object can
# fall on the other side of the 0.3 / 0.9 thresholds) and CLIPScore's CLIP-L/14 instance; then the official rules,
# rewritten: thresholds, top-16 per class, no NMS, box-centre relations, the partial-credit GRPO reward. Metadata:
#   {"tag": "position", "prompt": "a photo of a cow right of a laptop",
#    "include": [{"class": "laptop", "count": 1}, {"class": "cow", "count": 1, "position": ["right of", 0]}]}
# "color" may accompany an include entry; "position" = [relation, index of the reference entry].

GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# the 80 COCO instance classes in their contiguous order, label id i -> GENEVAL_OBJECTS[i], with GenEval's names
# for three of them (Detectron2's id2label says "mouse", "remote", "keyboard")
GENEVAL_OBJECTS = tuple(
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,stop sign,parking meter,"
    "bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,backpack,umbrella,handbag,tie,suitcase,frisbee,"
    "skis,snowboard,sports ball,kite,baseball bat,baseball glove,skateboard,surfboard,tennis racket,bottle,"
    "wine glass,cup,fork,knife,spoon,bowl,banana,apple,sandwich,orange,broccoli,carrot,hot dog,pizza,donut,cake,"
    "chair,couch,potted plant,bed,dining table,toilet,tv,laptop,computer mouse,tv remote,computer keyboard,"
    "cell phone,microwave,oven,toaster,sink,refrigerator,book,clock,vase,scissors,teddy bear,hair drier,"
    "toothbrush".split(","))
# official constants (rtdmd/rewards/geneval_scorer.py): detection confidence, stricter for counting prompts; at
# most 16 objects per class; NMS threshold 1.0 = no NMS; relation margin
GENEVAL_THRESHOLD, GENEVAL_COUNTING_THRESHOLD = 0.3, 0.9
GENEVAL_MAX_OBJECTS, GENEVAL_POSITION_MARGIN = 16, 0.1
GENEVAL_TOPK = 100  # mmdet Mask2Former test_cfg max_per_image: candidates kept per image
GENEVAL_GREY = 0x99 / 255  # the "#999" background the colour crops are composited on


def relative_position(box_a, box_b, margin=GENEVAL_POSITION_MARGIN):
    """The relations {"left of", "right of", "above", "below"} of box A to box B (x1, y1, x2, y2; y points down).
    The centre offset is shrunk on each axis by margin * (sum of the two boxes' sizes on that axis), then divided
    by the unshrunk offset's length; a relation holds where that direction's component exceeds 0.5. Overlapping,
    similar-sized boxes relate to nothing."""
    a, b = torch.as_tensor(box_a[:4], dtype=torch.float64), torch.as_tensor(box_b[:4], dtype=torch.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    size = (a[2:] - a[:2]).abs() + (b[2:] - b[:2]).abs()
    shrunk = (offset.abs() - margin * size).clamp(min=0) * offset.sign()
    if bool((shrunk.abs() < 1e-3).all()):
        return set()
    dx, dy = (shrunk / offset.norm()).tolist()
    return {rel for rel, holds in (("left of", dx < -0.5), ("right of", dx > 0.5),
                                   ("above", dy < -0.5), ("below", dy > 0.5)) if holds}


def geneval_verdict(objects, metadata, colors_of):
    """One image's GenEval result: (strict_correct, score, reasons).
    objects    {class name: [(box [x1, y1, x2, y2, score], mask or None), ...]}, highest score first, already
               thresholded (geneval_objects).
    metadata   the prompt's GenEval record (see above).
    colors_of  (objects of one class, class name) -> one colour name per object.
    score is the official partial credit (the GRPO reward): the mean of one term per check,
      count     1 - |expected - found| / expected         (negative if found > 2 * expected)
      colour    1 - |expected - matching| / expected      (0 if the count was already wrong)
      position  0 or 1 per failed/passed check            (0 if the count was already wrong)
    strict_correct needs every count exact, every colour and relation right. As in the official code: a colour or
    position entry whose count is wrong adds ONE zero term; a failed relation adds a 0 and then the 1 the loop
    appends after it ends (half a term lost); a colour failure skips that entry's position check (no term)."""
    correct, terms, reasons, groups = True, [], [], []
    for req in metadata.get("include", []):
        name, n = req["class"], req["count"]
        found = objects.get(name, [])
        ok = len(found) == n
        terms.append(1 - abs(n - len(found)) / n)
        if not ok:
            reasons.append(f"expected {n} {name}, found {len(found)}")
            if "color" in req or "position" in req:
                terms.append(0.0)
        if ok and "color" in req:
            hits = list(colors_of(found, name)).count(req["color"])
            terms.append(1 - abs(n - hits) / n)
            if hits != n:
                ok = False
                reasons.append(f"expected {n} {req['color']} {name}, found {hits}")
        if ok and "position" in req:
            rel, target = req["position"]
            ref = groups[target]  # None: the reference entry failed
            bad = ref and next(((o, t) for o in found for t in ref if rel not in relative_position(o[0], t[0])), None)
            if ref is None:
                reasons.append(f"no reference object for {name} to be {rel}")
                terms.append(0.0)
            else:
                if bad:
                    reasons.append(f"expected {name} {rel} the reference, found "
                                   f"{' and '.join(sorted(relative_position(bad[0][0], bad[1][0]))) or 'no relation'}")
                    terms.append(0.0)
                terms.append(1.0)  # official: appended after the loop, failure or not
            ok = ref is not None and not bad
        correct = correct and ok
        groups.append(found if ok else None)
    return correct, (sum(terms) / len(terms) if terms else 0.0), reasons


def geneval_correct(objects, metadata, colors_of):
    """GenEval's own verdict (the benchmark's `correct`; official code: rtdmd/rewards/geneval_scorer.py, `evaluate`,
    the value the official inference reports as `accuracy` with only_strict=False). Arguments as geneval_verdict.
    Looser than the strict verdict on counts: an include entry needs at least `count` objects, and its colour and
    relation are judged on the first `count` detections only. Stricter on one point: each `exclude` entry
    {"class", "count"} fails the image when `count` or more of that class are detected (counting: "exactly n")."""
    correct, groups = True, []
    for req in metadata.get("include", []):
        name, n = req["class"], req["count"]
        found = objects.get(name, [])[:n]
        ok = len(found) >= n
        if ok and "color" in req:
            ok = list(colors_of(found, name)).count(req["color"]) >= n
        if ok and "position" in req:
            rel, target = req["position"]
            ok = groups[target] is not None and all(rel in relative_position(o[0], t[0])
                                                    for o in found for t in groups[target])
        correct = correct and ok
        groups.append(found if ok else None)
    return correct and all(len(objects.get(r["class"], [])) < r["count"] for r in metadata.get("exclude", []))


def geneval_objects(labels, scores, boxes, masks, tag):
    """One image's detections -> {class: [(box + score, mask), ...]}: score > 0.3 (0.9 for counting prompts), best
    first, at most 16 per class (no NMS)."""
    threshold = GENEVAL_COUNTING_THRESHOLD if tag == "counting" else GENEVAL_THRESHOLD
    objects = {}
    for i in torch.argsort(torch.as_tensor(scores), descending=True, stable=True).tolist():
        if float(scores[i]) <= threshold:
            break
        found = objects.setdefault(GENEVAL_OBJECTS[int(labels[i])], [])
        if len(found) < GENEVAL_MAX_OBJECTS:
            found.append(([*map(float, boxes[i][:4]), float(scores[i])], None if masks is None else masks[i]))
    return objects


def masks_to_boxes(masks):
    """[N, H, W] bool -> [N, 4] (x1, y1, x2 + 1, y2 + 1) of the set pixels (empty: zeros), as mmdet's Mask2Former."""
    def span(hit):  # hit [N, L]: first and one past the last set index, on the masks' device
        at = torch.arange(hit.shape[1], device=hit.device)
        return torch.where(hit, at, hit.shape[1]).amin(1), torch.where(hit, at, -1).amax(1) + 1
    (x1, x2), (y1, y2) = span(masks.any(1)), span(masks.any(2))
    boxes = torch.stack([x1, y1, x2, y2], 1).float()
    return boxes * masks.flatten(1).any(1, keepdim=True)  # an empty mask: zeros


def check_coco_order(id2label, src):
    """Label id i must be GENEVAL_OBJECTS[i], compared loosely (case, "-"/"_", Detectron2's short names, <= 3 other
    spellings); an order that is off is an error. Unnamed labels (LABEL_i, random test models) are trusted."""
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(len(GENEVAL_OBJECTS))]
    if all(n.startswith("LABEL_") for n in names):
        return
    short = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
    norm = [n.lower().replace("-", " ").replace("_", " ") for n in names]
    wrong = [i for i, (n, want) in enumerate(zip(norm, GENEVAL_OBJECTS)) if short.get(n, n) != want]
    if len(wrong) > 3:
        raise ValueError(f"{src}: its labels are not the COCO-80 order GenEval expects, e.g. "
                         f"{[(i, names[i], GENEVAL_OBJECTS[i]) for i in wrong[:3]]}")


class Mask2FormerDetector(Lazy):
    """COCO instance segmentation with a transformers Mask2Former, on mmdet's test-time recipe: resize so the short
    side is 800 (long side at most 1333), ImageNet mean/std, zero-pad to a multiple of 32; then per image the top-100
    (query, class) pairs by class probability, each scored class probability x mean mask probability inside its
    binary mask (mask logit > 0 at full image size), its box the mask's bounding box."""
    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    SHORT, LONG, DIVISOR = 800, 1333, 32
    # candidates at or below the lowest GenEval threshold can never count (geneval_objects): they are dropped on
    # the device, so only the survivors' masks move to the host
    KEEP_ABOVE = min(GENEVAL_THRESHOLD, GENEVAL_COUNTING_THRESHOLD)

    def __init__(self, src):
        self.src = src

    def build(self):
        from transformers import Mask2FormerForUniversalSegmentation
        model = _pretrained(Mask2FormerForUniversalSegmentation, self.src, "geneval_detector",
                            "Mask2Former COCO instance model")
        if model.config.num_labels != len(GENEVAL_OBJECTS):
            raise ValueError(f"{self.src}: a GenEval detector needs the 80 COCO classes, this model has "
                             f"{model.config.num_labels} labels")
        check_coco_order(model.config.id2label, self.src)
        return model

    @torch.no_grad()
    def __call__(self, images):
        """images [B, 3, H, W] in [0, 1] -> per image (labels [K], scores [K], boxes [K, 4], masks [K, H, W] bool)."""
        model = self.load(images.device)
        h, w = images.shape[-2:]
        s = min(self.SHORT / min(h, w), self.LONG / max(h, w))
        nh, nw = round(h * s), round(w * s)
        x = normalise(F.interpolate(images.float(), size=(nh, nw), mode="bilinear", align_corners=False),
                      self.MEAN, self.STD)
        x = F.pad(x, (0, -nw % self.DIVISOR, 0, -nh % self.DIVISOR), value=0.0)
        out = model(pixel_values=x.to(model.dtype))
        results = []
        for cls, mask in zip(out.class_queries_logits.float(), out.masks_queries_logits.float()):
            prob = cls.softmax(-1)[:, :-1]  # the last class is "no object"
            top, idx = prob.flatten().topk(min(GENEVAL_TOPK, prob.numel()))
            labels, query = idx % prob.shape[1], idx // prob.shape[1]
            m = F.interpolate(mask[query][None], size=x.shape[-2:], mode="bilinear", align_corners=False)
            m = F.interpolate(m[..., :nh, :nw], size=(h, w), mode="bilinear", align_corners=False)[0]
            binary = m > 0
            score = top * ((m.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6))
            keep = score > self.KEEP_ABOVE  # order kept: geneval_objects sorts stably
            binary = binary[keep]
            results.append((labels[keep].cpu(), score[keep].cpu(), masks_to_boxes(binary).cpu(), binary.cpu()))
        return results


class GenEval:
    """GenEval's partial-credit score per image, at most 1 (every check passed), below 0 only with over twice the
    expected objects (down to 1 - 15: 16 found for 1); "geneval_strict" and "geneval_accuracy" in {0, 1}: the strict
    verdict and GenEval's own (geneval_correct). Needs each prompt's GenEval metadata. No gradient: GRPO and
    evaluation only."""
    name, needs_metadata = "geneval", True
    TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")

    def __init__(self, detector, clip):
        self.detector, self.clip, self.classifiers = detector, clip, {}

    def color_classifier(self, name, device):
        """[768, 10] zero-shot weights for one class: per colour, the normalised mean of the three templates'
        normalised text embeddings (clip_benchmark's zero_shot_classifier)."""
        if name not in self.classifiers:
            texts = [t.format(c=c, obj=name) for c in GENEVAL_COLORS for t in self.TEMPLATES]
            emb = self.clip.embed_text(texts, device).view(len(GENEVAL_COLORS), len(self.TEMPLATES), -1)
            self.classifiers[name] = F.normalize(emb.mean(1), dim=-1).t()
        return self.classifiers[name]

    def colors(self, image, found, name):
        """Each object's colour: its mask composited over grey, cropped to its box, then CLIP's best-matching colour
        (official: ImageCrops + zero-shot classification)."""
        clf = self.color_classifier(name, image.device)
        out = []
        for box, mask in found:
            x = image if mask is None else torch.where(mask.to(image.device), image, GENEVAL_GREY)
            x1, y1, x2, y2 = (round(v) for v in box[:4])  # PIL's crop rounds its box the same way
            crop = x[:, y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)][None]
            # open_clip's Resize + CenterCrop: torchvision rounds an odd margin (crop_offset)
            img, _ = self.clip.embed(crop, None, "crop", "bicubic", "round")
            out.append(GENEVAL_COLORS[int((img @ clf).argmax())])
        return out

    @torch.no_grad()
    def __call__(self, images, prompts, metadata=None):
        check_metadata([self.name], metadata, len(images))
        self.detector.load(images.device)
        self.clip.load(images.device)  # even if nothing is detected (preflight loads it all)
        score, strict, acc = [], [], []
        for img, dets, meta in zip(images, self.detector(images), metadata):
            objects = geneval_objects(*dets, meta.get("tag"))
            memo = {}  # both verdicts ask for the same objects' colours: classify each crop once

            def colors_of(found, name):
                todo = [o for o in found if id(o) not in memo]
                memo.update(zip(map(id, todo), self.colors(img, todo, name) if todo else []))
                return [memo[id(o)] for o in found]
            ok, s, _ = geneval_verdict(objects, meta, colors_of)
            score.append(s)
            strict.append(float(ok))
            acc.append(float(geneval_correct(objects, meta, colors_of)))
        # geneval: partial credit (GRPO); geneval_strict: the official `strict_accuracy`; geneval_accuracy:
        # GenEval's rule, the official `accuracy` (per tag: eval.geneval_by_tag)
        return {self.name: images.new_tensor(score), "geneval_strict": images.new_tensor(strict),
                "geneval_accuracy": images.new_tensor(acc)}

# --- OCR: Florence-2 reads the image, scored against the prompt's quoted text -------------------
# The official scorer (rtdmd/rewards/ocr_scorer.py) runs PaddleOCR (a text detector + a line recogniser) and
# rewards 1 - normalised edit distance to the text between the prompt's first pair of double quotes. Here
# Florence-2-base (0.23 B) with its "<OCR>" task reads a natural image's text in one generate call, no separate
# detector (TrOCR reads one pre-cropped line, GOT-OCR2 is 0.58 B and for documents, the PP-OCR ports need
# torchvision and OpenCV). Another reader misreads differently, so per-image scores can differ from PaddleOCR's
# either way.

def edit_distance(a, b):
    """Levenshtein distance (insert, delete, substitute, each cost 1), one DP row at a time."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def ocr_target(prompt):
    """The text the image must show: between the prompt's first two double quotes."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].replace(" ", ""):
        raise ValueError(f"ocr needs the text to render in double quotes in every prompt; got {prompt!r}")
    return parts[1]


def ocr_score(read, target):
    """Official OCR reward, on lower-cased texts without spaces: 1 if `read` contains the target, else
    1 - edit distance / target length, floored at 0."""
    read, target = read.replace(" ", "").lower(), target.replace(" ", "").lower()
    dist = 0 if target in read else min(edit_distance(read, target), len(target))
    return 1 - dist / len(target)


class OCR(Lazy):
    """Text accuracy in [0, 1] (ocr_score of what Florence-2 reads); no gradient (eval, GRPO-usable). Inputs: the
    checkpoint's Florence2Processor (image squashed to its square size; image tokens, then <s> task </s>)."""
    name = "ocr"

    def __init__(self, src, max_new_tokens=128, num_beams=3):
        self.src, self.max_new_tokens, self.num_beams = src, max_new_tokens, num_beams

    def build(self):
        from transformers import AutoProcessor, Florence2ForConditionalGeneration
        model = _pretrained(Florence2ForConditionalGeneration, self.src, "ocr", "Florence-2 model")
        self.processor = _pretrained(AutoProcessor, self.src, "ocr", "Florence-2 processor")
        return model

    @torch.no_grad()
    def read(self, images):
        """images [B, 3, H, W] in [0, 1] -> the text Florence-2 reads in each."""
        m = self.load(images.device)
        x = self.processor(text=["<OCR>"] * len(images), images=to_pil(images), return_tensors="pt").to(images.device)
        out = m.generate(input_ids=x.input_ids, pixel_values=x.pixel_values.to(m.dtype),
                         max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False)
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]

    def __call__(self, images, prompts):
        targets = [ocr_target(p) for p in prompts]  # fails before any model work
        return {self.name: images.new_tensor([ocr_score(r, t) for r, t in zip(self.read(images), targets)])}

# --- HPSv3: a Qwen2-VL-7B preference model, loaded into transformers' Qwen2-VL classes -----------
# The official scorer (rtdmd/rewards/hpsv3_scorer.py) runs the hpsv3 package's HPSv3RewardInferencer and keeps mu,
# the first of its two outputs (a Gaussian preference score and its uncertainty). The network
# (hpsv3/model/qwen2vl_trainer.py, Qwen2VLRewardModelBT, "ranknet" head, output_dim 2): Qwen2-VL-7B-Instruct plus
# a token <|Reward|>, whose last hidden state feeds rm_head, an MLP 3584 -> 1024 -> 16 -> 2 (HPSv3Net). Its forward
# passes no position ids, so every token, image tokens included, gets plain sequential rotary positions; so do we.
# Input (hpsv3/inference.py, data_collator_qwen.py): the image at exactly 256 * 28 * 28 pixels, one user message
# "<image>" + the package's instruction (with the prompt) + "...: <|Reward|> END" in Qwen2-VL's chat template. The
# instruction is the HPSv3 authors' prose: read from the package's source, never copied here. hpsv3_to_hf maps
# either key layout (HPSv3.safetensors: the older "visual.*", "model.*", "lm_head.*").

def hpsv3_template(src=None):
    """(instruction with {text_prompt}, closing with <|Reward|>) from hpsv3/dataset/data_collator_qwen.py, read with
    ast, never imported. `src`: that file, a folder holding the package, its .whl, or None (the installed one)."""
    import ast
    import importlib.util
    import zipfile
    rel = "hpsv3/dataset/data_collator_qwen.py"
    if src is None:
        spec = importlib.util.find_spec("hpsv3")  # locates the package without importing it
        src = os.path.dirname(os.path.dirname(spec.origin)) if spec and spec.origin else ""
    path, text = (src if os.path.isfile(src) else os.path.join(src, rel)), None
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            text = z.read(rel).decode() if rel in z.namelist() else None
    elif os.path.isfile(path):
        text = open(path, encoding="utf-8").read()
    found = {t.id: n.value.value for n in (ast.parse(text).body if text else ())
             if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) for t in n.targets
             if isinstance(t, ast.Name) and t.id in ("INSTRUCTION", "prompt_with_special_token")}
    if len(found) != 2:
        raise FileNotFoundError(
            f"HPSv3 prompt template not found at {src!r}: `pip download hpsv3 --no-deps` (or install "
            f"it) and pass the wheel or {rel} as sources['hpsv3_template'] (--reward-paths hpsv3_template=PATH)")
    return found["INSTRUCTION"], found["prompt_with_special_token"]


class HPSv3Net(nn.Module):
    """Qwen2-VL (transformers' Qwen2VLModel: .visual, .language_model) + the ranknet head."""

    def __init__(self, config, output_dim=2):
        super().__init__()
        from transformers import Qwen2VLModel
        self.backbone = Qwen2VLModel(config)
        d = config.text_config.hidden_size
        self.rm_head = nn.Sequential(nn.Linear(d, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16),
                                     nn.ReLU(), nn.Linear(16, output_dim))

    def forward(self, input_ids, attention_mask, pixel_values, grid_thw, reward_id):
        """[B, output_dim] head outputs at the <|Reward|> token (column 0 = the score)."""
        bb = self.backbone
        emb = bb.get_input_embeddings()(input_ids)
        img = bb.visual(pixel_values.to(emb.dtype), grid_thw=grid_thw).pooler_output
        emb = emb.masked_scatter((input_ids == bb.config.image_token_id)[..., None], img.to(emb.dtype))
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        h = bb.language_model(inputs_embeds=emb, attention_mask=attention_mask, position_ids=pos).last_hidden_state
        at = input_ids == reward_id
        if not bool((at.sum(1) == 1).all()):
            raise ValueError("HPSv3 input must hold exactly one <|Reward|> token per sequence")
        return self.rm_head(h[at].float())


def hpsv3_to_hf(sd):
    """HPSv3 state dict (either key layout) -> HPSv3Net's; lm_head dropped (the reward reads hidden states only)."""
    def rename(k, v):
        if k.startswith("rm_head."):
            return {k: v}
        if k.startswith(("visual.", "model.visual.")):
            return {"backbone.visual." + k.split("visual.", 1)[1]: v}
        if k.startswith("model."):  # model.language_model.*, or the older layout's model.*: the language model
            return {"backbone.language_model." + k.removeprefix("model.").removeprefix("language_model."): v}
        return {} if k.startswith("lm_head.") else None
    return _convert(sd, rename, "hpsv3_to_hf")


def qwen_chat(tokenizer, n_img, texts, device):
    """One user turn per text, after one image of n_img tokens, in the checkpoint's chat template (Qwen2-VL's adds
    its default system message), tokenised and right-padded."""
    image = "<|vision_start|>" + "<|image_pad|>" * n_img + "<|vision_end|>"
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": image + t}], tokenize=False,
                                           add_generation_prompt=True) for t in texts]
    tokenizer.padding_side = "right"
    return tokenizer(chats, padding=True, return_tensors="pt", add_special_tokens=False).to(device)


def qwen_image(processor, images):
    """[B, 3, H, W] in [0, 1] -> (pixel_values, grid_thw, image tokens per image) from a Qwen-VL image processor
    (its smart_resize, normalisation and patch order), on the images' device."""
    x = processor(images=to_pil(images), return_tensors="pt").to(images.device)
    return x.pixel_values, x.image_grid_thw, int(x.image_grid_thw[0].prod()) // processor.merge_size ** 2


class HPSv3(Lazy):
    """HPSv3 preference score (mu), ~10-16 on good images (paper 10.1-15.6); no gradient, an evaluation metric in
    RTDMD. bf16 on CUDA (as the hpsv3 package runs), else float32; the head always float32."""
    name = "hpsv3"
    PIXELS = 256 * 28 * 28  # min_pixels = max_pixels in the package's inference code

    def __init__(self, src, base_src, config=None, template_src=None):
        self.src, self.base_src, self.config, self.template_src = src, base_src, config, template_src

    def build(self):
        from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLImageProcessorPil
        self.template = hpsv3_template(self.template_src)
        path, sd = _checkpoint(self.src, ("HPSv3.safetensors",), "hpsv3", "HPSv3 checkpoint")
        sd = hpsv3_to_hf(sd)
        config = _config(Qwen2VLConfig, self.config,
                         lambda: _pretrained(Qwen2VLConfig, self.base_src, "hpsv3_base", "Qwen2-VL config"))
        tok = _pretrained(AutoTokenizer, self.base_src, "hpsv3_base", "Qwen2-VL tokenizer")
        tok.chat_template = tok.chat_template or _chat_template(self.base_src, "hpsv3_base")
        tok.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
        self.reward_id = tok.convert_tokens_to_ids("<|Reward|>")
        # the package resized the embedding table to the tokenizer plus <|Reward|>
        config.text_config.vocab_size = sd["backbone.language_model.embed_tokens.weight"].shape[0]
        net = _load_strict(HPSv3Net(config, sd["rm_head.5.weight"].shape[0]), sd, path)
        self.tokenizer = tok
        vc = config.vision_config  # Qwen2-VL's processor at the package's fixed pixel budget
        self.processor = Qwen2VLImageProcessorPil(
            min_pixels=self.PIXELS, max_pixels=self.PIXELS, patch_size=vc.patch_size,
            merge_size=vc.spatial_merge_size, temporal_patch_size=vc.temporal_patch_size)
        return net

    def load(self, device=None):
        """As Lazy.load, and the backbone in bf16 on CUDA, float32 elsewhere."""
        net = super().load()
        if device is not None and next(net.parameters()).device != torch.device(device):
            net.to(device)
            net.backbone.to(torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
        return net

    def inputs(self, images, prompts):
        """Token ids, attention mask, pixel values and grid of a batch (right-padded)."""
        px, grid, n_img = qwen_image(self.processor, images)
        instruction, closing = self.template
        texts = [instruction.format(text_prompt=p) + closing for p in prompts]
        tok = qwen_chat(self.tokenizer, n_img, texts, images.device)
        return tok.input_ids, tok.attention_mask, px, grid

    @torch.no_grad()
    def __call__(self, images, prompts):
        out = self.load(images.device)(*self.inputs(images, prompts), self.reward_id)
        return {self.name: out[:, 0].to(images.dtype)}

# --- GenEval2: Soft-TIFA with Qwen3-VL ------------------------------------------------------------
# The official scorer (rtdmd/rewards/geneval2_scorer.py) asks Qwen3-VL-8B-Instruct one question per "atom" of the
# prompt (its .jsonl record's vqa_list, e.g. ["How many pigs are in the image?", "one"], ["Is the backpack
# green?", "Yes"]) as "<question> Answer in one word." with the image; an atom scores the sum, over a list of
# spellings of the expected answer, of the probability of each spelling's first token (a first token shared by
# two spellings counts twice):
#   "How many" questions: answer, Answer, " answer", " Answer", digit, " digit"  (digit of one..ten, else "other")
#   every other question: "Yes", "yes", " Yes", " yes"
# A prompt scores the geometric mean of its atoms' (0 if any is 0; -10 for a record without atoms). The official
# code reads the probabilities off a one-token greedy generate; one forward pass gives the same distribution
# while the generation config has no logits processor.

NUMBER_WORDS = {w: str(i) for i, w in enumerate("one two three four five six seven eight nine ten".split(), 1)}


def soft_tifa_answers(question, answer):
    """The spellings whose first-token probabilities add up to an atom's score."""
    if question.startswith("How many"):
        digit = NUMBER_WORDS.get(answer.strip().lower(), "other")
        return [answer, answer.capitalize(), " " + answer, " " + answer.capitalize(), digit, " " + digit]
    return ["Yes", "yes", " Yes", " yes"]


def geometric_mean(values):
    """exp(mean(log v)); 0 when any value is 0."""
    if not values:
        raise ValueError("geometric_mean of nothing")
    if min(values) <= 0:
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _chat_template(src, slot="geneval2"):
    """A checkpoint's chat template from its processor files (chat_template.jinja or .json)."""
    import json
    from transformers.utils import cached_file
    for name in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(src, name, _raise_exceptions_for_missing_entries=False)
        if path:
            text = open(path, encoding="utf-8").read()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    raise FileNotFoundError(f"no chat template in {src!r} (tokenizer_config.json, chat_template.jinja or "
                            f"chat_template.json); download the whole hub repo {DEFAULT_SOURCES[slot]}")


class GenEval2(Lazy):
    """Soft-TIFA in [0, 1]: geometric mean over the prompt's atoms of Qwen3-VL's P(expected one-word answer). Needs
    each prompt's record with its vqa_list (official dataset/geneval2 .jsonl). No gradient: an evaluation metric."""
    name, needs_metadata = "geneval2", True
    SUFFIX = " Answer in one word."

    def __init__(self, src):
        self.src = src

    def build(self):
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration
        model = _pretrained(Qwen3VLForConditionalGeneration, self.src, "geneval2", "Qwen3-VL model")
        self.tokenizer = _pretrained(AutoTokenizer, self.src, "geneval2", "Qwen3-VL tokenizer")
        self.tokenizer.chat_template = self.tokenizer.chat_template or _chat_template(self.src)
        self.processor = _pretrained(AutoImageProcessor, self.src, "geneval2", "Qwen3-VL image processor")
        return model

    def image_inputs(self, image):
        """One [3, H, W] image -> (pixel_values, grid_thw [1, 3], number of image tokens)."""
        return qwen_image(self.processor, image[None])

    @torch.no_grad()
    def atom_probabilities(self, image, vqa_list):
        """P(expected answer) for every (question, answer) of one image, in one batch."""
        m = self.load(image.device)
        px, grid, n_img = self.image_inputs(image)
        tok = qwen_chat(self.tokenizer, n_img, [str(q) + self.SUFFIX for q, _ in vqa_list], image.device)
        k, ids = len(vqa_list), tok.input_ids
        logits = m(input_ids=ids, attention_mask=tok.attention_mask, pixel_values=px.repeat(k, 1).to(m.dtype),
                   image_grid_thw=grid.repeat(k, 1), mm_token_type_ids=(ids == m.config.image_token_id).long()).logits
        last = tok.attention_mask.sum(1) - 1  # the generation prompt's last token
        probs = logits[torch.arange(k), last].float().softmax(-1)
        out = []
        for row, (q, a) in zip(probs, vqa_list):
            firsts = [self.tokenizer.encode(s, add_special_tokens=False)[:1] for s in soft_tifa_answers(str(q), str(a))]
            out.append(sum(row[t[0]].item() for t in firsts if t))
        return out

    def __call__(self, images, prompts, metadata=None):
        check_metadata([self.name], metadata, len(images))
        scores = [geometric_mean(self.atom_probabilities(img, meta["vqa_list"])) if meta["vqa_list"] else -10.0
                  for img, meta in zip(images, metadata)]
        return {self.name: images.new_tensor(scores)}

# ---------------------------------------------------------------------------------------------
# 3. Weighted multi-reward
# ---------------------------------------------------------------------------------------------

# GRPO scores uint8 images without gradient and takes advantages PER REWARD before weighting (subgrpo.py), so
# MultiReward returns the per-reward tensors with their weighted sum; reward back-prop scores float images WITH
# gradient, the weighted differentiable subset.
# The official stage-2 reward set of every backbone (configs/rtdmd/*.yaml, weight_advantages: true)
GRPO_WEIGHTS = {"clipscore": 1.0, "hpsv2": 1.0, "pickscore": 1.0, "geneval": 1.0}
# what the official BP scores in its default mode (rtdmd/trainers/bp_mixin.py, _supported_bp_training_rewards);
# other GRPO rewards are left out of the back-prop term
BP_CAPABLE = ("clipscore", "pickscore", "hpsv2")
EVAL_WEIGHTS = {n: 1.0 for n in ("clipscore", "pickscore", "aesthetic", "hpsv2", "imagereward")}


def make_scorers(names, sources=None, cache=None):
    """{name: scorer}, nothing loaded yet. `cache` (a dict) shares scorers, so the CLIP-L/14 of clipscore and
    aesthetic, and every model of both the GRPO and the back-prop reward sets, exists once."""
    src = {**DEFAULT_SOURCES, **(sources or {})}
    cache = {} if cache is None else cache

    def clip_l():
        return cache.setdefault("clip_l", CLIPBackbone(src["clip_l"], slot="clip_l"))

    builders = {
        "clipscore": lambda: CLIPScore(clip_l()),
        "aesthetic": lambda: Aesthetic(clip_l(), src["aesthetic_head"]),
        "pickscore": lambda: PickScore(CLIPBackbone(src["pickscore"], src["pickscore_tokenizer"], slot="pickscore")),
        "hpsv2": lambda: HPSv2(CLIPBackbone(src["hpsv2"], src["hpsv2_tokenizer"], slot="hpsv2",
                                            make=lambda: load_hpsv2(src["hpsv2"], src["hpsv2_config"]))),
        "imagereward": lambda: ImageReward(src["imagereward"], src["imagereward_tokenizer"], src["imagereward_config"]),
        "geneval": lambda: GenEval(Mask2FormerDetector(src["geneval_detector"]), clip_l()),
        "ocr": lambda: OCR(src["ocr"]),
        "geneval2": lambda: GenEval2(src["geneval2"]),
        "hpsv3": lambda: HPSv3(src["hpsv3"], src["hpsv3_base"], src["hpsv3_config"], src["hpsv3_template"]),
        **SHAPES_SCORERS,  # mini-sd3's (section 4)
    }
    for n in names:
        if n not in builders:
            raise NotImplementedError(f"reward {n!r} is not implemented; available: {sorted(builders)}")
        if n not in cache:
            cache[n] = builders[n]()
    return {n: cache[n] for n in names}


class MultiReward:
    """reward(images, prompts) -> {name: Tensor[B] for each weighted name, "weighted": Tensor[B]}
    weighted = sum_k w_k * r_k. quantize=True scores round(255 x)/255 (GRPO, eval); keep it False for back-prop,
    whose gradient it would zero. share=another MultiReward: reuse its scorers (models, sources) for every name they
    have in common. records: a .jsonl prompt file's records; a call without metadata looks each prompt's record up
    by its text (as the official GenEval2 scorer does), so a loop that passes prompts alone can score geneval and
    geneval2."""

    def __init__(self, weights, sources=None, quantize=False, share=None, records=None):
        self.weights, self.quantize = dict(weights), quantize
        self.cache = share.cache if share is not None else {}
        self.scorers = make_scorers(self.weights, sources, self.cache)
        self.records = {r["prompt"]: r for r in records} if records else None

    def __call__(self, images, prompts, metadata=None):
        """metadata: None or one .jsonl record per prompt, passed to the scorers with needs_metadata."""
        if metadata is None and self.records is not None:
            metadata = [self.records.get(p) for p in prompts]
        if self.quantize:
            images = quantize_uint8(images)
        out = {}
        for scorer in self.scorers.values():
            out.update(scorer(images, prompts, metadata) if getattr(scorer, "needs_metadata", False)
                       else scorer(images, prompts))
        out["weighted"] = sum(w * out[n] for n, w in self.weights.items())
        return out


def parse_reward_paths(text):
    """"slot=path,slot=path" -> {slot: path}; a slot may be spelt with "-" (clip-l=...)."""
    out = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        slot, eq, path = item.partition("=")
        slot = slot.strip().replace("-", "_")
        if not eq or slot not in DEFAULT_SOURCES or not path.strip():
            raise ValueError(f"reward path {item!r} is not SLOT=PATH with SLOT one of {', '.join(DEFAULT_SOURCES)}")
        out[slot] = path.strip()
    return out


def add_source_args(parser):
    """--reward-paths slot=path,... (slots of DEFAULT_SOURCES), on an argparse parser or group; train.py and eval.py
    share this one definition. A bad item is a usage error naming the slots."""
    import argparse

    def checked(text):
        try:
            parse_reward_paths(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    parser.add_argument("--reward-paths", default=None, type=checked, metavar="SLOT=PATH,...",
                        help="reward checkpoints as hub ids or local paths, e.g. clip_l=ckpt/clip,"
                        f"hpsv2=ckpt/HPS_v2.1_compressed.pt; slots: {', '.join(DEFAULT_SOURCES)}")


def sources_from_args(args):
    """{slot: path} of --reward-paths (the other slots keep their DEFAULT_SOURCES)."""
    return parse_reward_paths(args.reward_paths)


def preflight(reward_set, device):
    """Score one random image, so every model of a (lazy) reward set loads now and a missing checkpoint fails
    before any generation or training, with the loaders' one-line errors."""
    prompt = 'a photo of a dog with a sign that says "dog"'  # quotes for ocr, metadata for geneval
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": prompt,
            "vqa_list": [["Is there a dog in the image?", "Yes"]]}  # geneval2's atoms
    with torch.no_grad():
        reward_set(torch.rand(1, 3, 64, 64, device=device), [prompt], [meta])


def training_rewards(sources=None, weights=GRPO_WEIGHTS, records=None):
    """(grpo, bp) reward sets for stage 2, sharing their models. bp = the BP-capable subset of the GRPO rewards with
    the same weights (the official default, "training_reward_fn" mode of rtdmd/trainers/bp_mixin.py): {clipscore,
    hpsv2, pickscore} for the paper's weights. Call grpo under torch.no_grad(). records: the prompt file's .jsonl
    records geneval needs (MultiReward)."""
    grpo = MultiReward(weights, sources, quantize=True, records=records)
    bp = MultiReward({n: w for n, w in weights.items() if n in BP_CAPABLE}, sources, share=grpo)
    return grpo, bp


def eval_rewards(sources=None, weights=EVAL_WEIGHTS, share=None):
    """All metrics on uint8 images (section 2). Tables: pickscore * PICKSCORE_TABLE_SCALE."""
    return MultiReward(weights, sources, quantize=True, share=share)

# ---------------------------------------------------------------------------------------------
# 4. mini-sd3's rewards: a detector verdict on drawn shapes, and its soft, differentiable twin
# ---------------------------------------------------------------------------------------------

# mini-sd3 (models.py, section 7) draws 1-3 shapes of one colour on white, so a detector needs no
# network: each pixel takes the nearest colour of the palette (white included), each colour's
# pixels split into 8-connected components (the shapes: drawings keep them >= 2 px apart), and a
# component's fill ratio area / bounding-box area names its shape: square 1, circle ~0.78,
# triangle ~0.53 on the drawings, split at the midpoints 0.9 and 0.66. Components smaller than a
# third of the smallest drawn shape (36 px of 1024) are decoding noise, not objects.
SHAPE_AREA = {"square": (64, 121), "circle": (52, 97), "triangle": (36, 61)}  # drawn px of 32 x 32, sizes 8-11
# ShapesSoft's shape term: which corners of its bounding box a drawn shape fills (top-left, top-right,
# bottom-left, bottom-right; the triangle stands on its base), read on the 2 pixels of each corner
SHAPE_CORNERS = {"square": (1, 1, 1, 1), "circle": (0, 0, 0, 0), "triangle": (0, 0, 1, 1)}
SHAPE_CORNER_WEIGHT = 1.0  # every corner wrong costs as much as a missing shape


def corner_pixels(box):
    """The 2 pixels (y, x) of each corner of a box (x0, y0, x1, y1): the corner and its neighbour along the row."""
    x0, y0, x1, y1 = box
    return [(y, x) for y, x, dx in ((y0, x0, 1), (y0, x1, -1), (y1, x0, 1), (y1, x1, -1)) for x in (x, x + dx)]


def shapes_objects(image, boxes=False):
    """The shapes in one picture [3, H, W] in [0, 1]: [(colour, shape, cx, cy)], centres in [0, 1];
    boxes=True appends each one's bounding box (x0, y0, x1, y1) in pixels, ends included."""
    palette = torch.tensor([models.MINI_BACKGROUND] + list(models.MINI_COLOURS.values()),
                           dtype=torch.float32, device=image.device) / 255
    H, W = image.shape[-2:]
    near = ((image.float()[None] - palette[:, :, None, None]) ** 2).sum(1).argmin(0)  # [H, W]
    masks = (near[None] == torch.arange(1, len(palette), device=image.device)[:, None, None]).float()
    # connected components by label propagation: every pixel takes the largest label among its 8
    # neighbours of the same colour until nothing changes; then a component = one label
    lab = masks * torch.arange(1, H * W + 1, device=image.device, dtype=torch.float32).view(1, H, W)
    while True:
        new = F.max_pool2d(lab[:, None], 3, 1, 1)[:, 0] * masks
        if torch.equal(new, lab):
            break
        lab = new
    found = []
    for k, colour in enumerate(models.MINI_COLOURS):
        for i in lab[k].unique()[1:]:  # 0 is "not this colour"
            ys, xs = torch.nonzero(lab[k] == i, as_tuple=True)
            if len(ys) * 85 < H * W:  # under 12 px of 1024
                continue
            fill = len(ys) / float((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
            shape = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"
            found.append((colour, shape, (xs.float().mean().item() + 0.5) / W, (ys.float().mean().item() + 0.5) / H))
            if boxes:
                found[-1] += ((xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item()),)
    return found


def shapes_features(objects):
    """A picture's detector features, for eval.py's energy distance to drawn pictures: objects per
    colour (5), per shape (3), and their mean centre (x, y in [0, 1]; 0.5, 0.5 for none)."""
    f = [sum(o[0] == c for o in objects) for c in models.MINI_COLOURS] + \
        [sum(o[1] == s for o in objects) for s in models.MINI_SHAPES]
    return f + ([sum(o[k] for o in objects) / len(objects) for k in (2, 3)] if objects else [0.5, 0.5])


def in_region(cx, cy, position):
    """The verdict's position rule: the shape's centre in the outer 40% on that side."""
    return {"on the left": cx < 0.4, "on the right": cx > 0.6, "at the top": cy < 0.4, "at the bottom": cy > 0.6}[position]


def shapes_verdict(objects, prompt):
    """(strict, score) of one picture's objects against its prompt, GenEval-style (section 2):
    strict needs exactly the prompt's shapes and nothing else (count, colour, shape and, if the
    prompt has one, position of every object); score is the partial credit, the mean of one
    term per check, each clamped to [0, 1] (GenEval's count term may go negative; not here):
      count 1 - |n - objects| / n,  colour 1 - |n - of that colour| / n,
      shape 1 - |n - of that colour and shape| / n,  position: the share of those n in place.
    A prompt outside mini-sd3's grammar scores (False, 0.0)."""
    spec = models.parse_mini_prompt(prompt)
    if spec is None:
        return False, 0.0
    n, colour, shape, pos = spec
    right = [o for o in objects if o[:2] == (colour, shape)]
    placed = [o for o in right if pos is None or in_region(o[2], o[3], pos)]
    terms = [1 - abs(n - m) / n for m in (len(objects), sum(o[0] == colour for o in objects), len(right))]
    terms += [min(len(placed), n) / n] if pos else []
    strict = len(objects) == n and len(placed) == n
    return strict, sum(max(0.0, t) for t in terms) / len(terms)


class Shapes:
    """mini-sd3's detector reward, no gradient (GRPO, eval): "shapes" the partial credit,
    "shapes_strict" the 0/1 verdict (the accuracy in the README's tables)."""

    def __init__(self, name="shapes"):
        self.name = name

    def __call__(self, images, prompts):
        with torch.no_grad():
            verdicts = [shapes_verdict(shapes_objects(im), p) for im, p in zip(images, prompts)]
        k = int(self.name == "shapes")  # the score, else the strict verdict
        return {self.name: torch.tensor([float(v[k]) for v in verdicts], device=images.device)}


class ShapesSoft:
    """"shapes_soft", differentiable (the back-prop term): a soft count by colour mass. Each
    pixel's soft membership of the palette, softmax(-|rgb - colour|^2 / 0.01), summed per colour,
    is that colour's area A_c. n drawn shapes cover between n lo and n hi pixels (SHAPE_AREA), so
        1 - (distance of A_colour from [n lo, n hi] + A_other colours) / (n (lo + hi) / 2)
    is 1 on a clean drawing and falls by ~1 per shape missing, extra or of another colour; for a
    position prompt minus 2 x how far the colour's mass centre lies outside the verdict's region.
    The shape: the verdict reads it from the fill ratio of each component's bounding box, and the
    4-step generator's most common miss is a square with soft corners, read as a circle (stage 1:
    shape right on 57% of pictures, count 77%, colour 91%). Soft membership cannot fix that: it
    saturates at 0 on white-ish corners, so their gradient vanishes. So each shape of the colour that
    the detector finds keeps its box (fixed, no gradient), and the 2 pixels of each corner
    (corner_pixels) are read linearly, t = (pixel - white) . (colour - white) / |colour - white|^2,
    0 on white and 1 on the colour; minus SHAPE_CORNER_WEIGHT x the mean |t - SHAPE_CORNERS|. A
    corner template, not a fill ratio: a fill ratio inside a fixed box is raised or lowered by
    growing or shrinking the whole shape, which its gradient then does (stage 2 lowered both
    rewards with it), while the corners tell the three shapes apart at any size."""

    def __call__(self, images, prompts):
        palette = torch.tensor([models.MINI_BACKGROUND] + list(models.MINI_COLOURS.values()),
                               dtype=images.dtype, device=images.device) / 255
        d2 = ((images[:, None] - palette[None, :, :, None, None]) ** 2).sum(2)  # [B, 6, H, W]
        member = torch.softmax(-d2 / 0.01, dim=1)[:, 1:]  # [B, 5, H, W], white dropped
        mass = member.mean((2, 3)) * 1024  # area per colour, in pixels of a 32 x 32 image
        H, W = images.shape[-2:]
        ys, xs = ((torch.arange(H, device=images.device) + 0.5) / H), ((torch.arange(W, device=images.device) + 0.5) / W)
        out = []
        for b, prompt in enumerate(prompts):
            spec = models.parse_mini_prompt(prompt)
            if spec is None:
                out.append(images[b].sum() * 0)
                continue
            n, colour, shape, pos = spec
            k = list(models.MINI_COLOURS).index(colour)
            lo, hi = SHAPE_AREA[shape]
            off = F.relu(n * lo - mass[b, k]) + F.relu(mass[b, k] - n * hi) + mass[b].sum() - mass[b, k]
            r = 1 - off / (n * (lo + hi) / 2)
            boxes = [o[4] for o in shapes_objects(images[b].detach(), boxes=True) if o[0] == colour]
            if boxes:  # each corner pixel as its share of the way from white to the colour: linear, never saturates
                yx = torch.tensor([corner_pixels(box) for box in boxes], device=images.device)  # [boxes, 8, 2]
                c, px = palette[k + 1] - palette[0], images[b][:, yx[..., 0], yx[..., 1]]  # px [3, boxes, 8]
                t = torch.einsum("cbp,c->bp", px - palette[0][:, None, None], c) / c.dot(c)
                r = r - SHAPE_CORNER_WEIGHT * (t - t.new_tensor(SHAPE_CORNERS[shape]).repeat_interleave(2)).abs().mean()
            if pos:
                m = member[b, k] / member[b, k].sum().clamp_min(1e-6)
                cx, cy = (m.sum(0) * xs).sum(), (m.sum(1) * ys).sum()
                r = r - 2 * {"on the left": F.relu(cx - 0.4), "on the right": F.relu(0.6 - cx),
                             "at the top": F.relu(cy - 0.4), "at the bottom": F.relu(0.6 - cy)}[pos]
            out.append(r)
        return {"shapes_soft": torch.stack(out)}


SHAPES_SCORERS = {"shapes": lambda: Shapes("shapes"), "shapes_strict": lambda: Shapes("shapes_strict"),
                  "shapes_soft": ShapesSoft}  # make_scorers' builders include these
BP_CAPABLE = BP_CAPABLE + ("shapes_soft",)  # training_rewards back-propagates it
