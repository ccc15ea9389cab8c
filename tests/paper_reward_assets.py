"""
Tiny random stand-ins for the paper's other reward models (rewards.py: GenEval's Mask2Former,
OCR's Florence-2, HPSv3's Qwen2-VL, GenEval2's Qwen3-VL), written in the format of their real checkpoints and loaded
back through rewards.py's real loading code (test_rewards_geneval.py, test_rewards_ocr.py,
test_rewards_hpsv3.py, test_rewards_geneval2.py, test_eval_paper_rewards.py).

    paths = build_paper_reward_assets(folder)   # slot -> path, for MultiReward(sources=) or the CLI
"""
import json

import torch
from safetensors.torch import save_file
from tokenizers.pre_tokenizers import ByteLevel
from transformers import BartConfig, BartTokenizer, CLIPImageProcessorPil, Florence2Config, \
    Florence2ForConditionalGeneration, Florence2Processor, Florence2VisionConfig, Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen3VLConfig, \
    Qwen3VLForConditionalGeneration


# --- GenEval: Mask2Former ------------------------------------------------------------------------

def tiny_mask2former(folder, num_queries=3, dog=16):
    """A tiny random COCO Mask2Former whose class head says "dog" for every query."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=2,
                            num_attention_heads=2, num_queries=num_queries, num_labels=80)
    torch.manual_seed(0)
    m = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():
        m.class_predictor.weight.zero_()
        m.class_predictor.bias.fill_(-10.0)
        m.class_predictor.bias[dog] = 10.0
    m.save_pretrained(folder)
    return str(folder)



# --- OCR: Florence-2 ------------------------------------------------------------------------------

def tiny_florence(folder):
    """A tiny random Florence-2 with a byte-level BART tokenizer, saved as a checkpoint folder
    (model and its Florence2Processor: <image> token, CLIP image processor squashing to 64 px)."""
    chars = sorted(ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + chars)}
    (folder / "t").mkdir(parents=True)
    (folder / "t" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "t" / "merges.txt").write_text("#version: 0.2\n")
    tok = BartTokenizer(str(folder / "t" / "vocab.json"), str(folder / "t" / "merges.txt"),
                        extra_special_tokens={"image_token": "<image>"})
    vision = Florence2VisionConfig(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                                   patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 2],
                                   num_groups=[2, 2], window_size=4, projection_dim=32,
                                   max_position_embeddings=16, drop_path_rate=0.0)
    text = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                      max_position_embeddings=128, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                      decoder_start_token_id=2)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(Florence2Config(vision_config=vision, text_config=text,
                                                              image_token_id=tok.image_token_id)).eval()
    model.save_pretrained(folder)
    with torch.no_grad():  # the processor writes one <image> token per image feature
        n_img = model.get_image_features(pixel_values=torch.zeros(1, 3, 64, 64)).pooler_output.shape[1]
    image = CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False, image_seq_length=n_img,
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    Florence2Processor(image_processor=image, tokenizer=tok).save_pretrained(folder)
    return str(folder)



# --- HPSv3: Qwen2-VL + ranknet head ----------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
TEMPLATE = '''
raise RuntimeError("this file is read, never imported")
INSTRUCTION = """
Rate this image for the prompt - {text_prompt}
"""
prompt_with_special_token = """
Please provide the overall ratings of this image: <|Reward|>

END
"""
'''


# Qwen2-VL's chat format for string contents: its default system message, each turn, the assistant's
QWEN2VL_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a "
    "helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """Byte-level Qwen2 tokenizer built in memory, with Qwen2-VL's chat and vision tokens."""
    chars = sorted(ByteLevel.alphabet())
    tok = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(chars)}, merges=[], model_max_length=8192)
    tok.add_tokens(SPECIALS, special_tokens=True)
    tok.chat_template = QWEN2VL_CHAT_TEMPLATE
    return tok


def tiny_config(tok):
    """Qwen2-VL with the real patch 14 / merge 2 / temporal 2 and M-RoPE sections, tiny widths.
    vocab = tokenizer + <|Reward|>, as the package's resize_token_embeddings leaves it."""
    ids = tok.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok) + 1, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=None,
                         eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=ids("<|image_pad|>"), vision_start_token_id=ids("<|vision_start|>"))


def released_layout(cfg, seed=0):
    """A state dict in HPSv3.safetensors' layout: transformers' Qwen2VLForConditionalGeneration
    renamed to the older layout, plus the ranknet head of qwen2vl_trainer.py (rm_head_kwargs unset:
    Linear(d, 1024), ReLU, Dropout, Linear(1024, 16), ReLU, Linear(16, 2) = keys 0, 3, 5)."""
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.visual."):
            sd["visual." + k[len("model.visual."):]] = v
        elif k.startswith("model.language_model."):
            sd["model." + k[len("model.language_model."):]] = v
        else:
            sd[k] = v  # lm_head.weight
    d = cfg.text_config.hidden_size
    for name, shape in (("0", (1024, d)), ("3", (16, 1024)), ("5", (2, 16))):
        sd[f"rm_head.{name}.weight"] = torch.randn(shape) / shape[1] ** 0.5
        sd[f"rm_head.{name}.bias"] = torch.randn(shape[0]) * 0.1
    return sd, model



# --- GenEval2: Qwen3-VL ----------------------------------------------------------------------------

# Qwen3's chat format for one user turn (no default system message), then the assistant's turn
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen3vl(folder):
    """A tiny random Qwen3-VL (real patch 16 / merge 2 / temporal 2, deepstack, M-RoPE) with the
    byte-level tokenizer and a chat template, plus an image-processor config whose pixel budget
    keeps a 64 x 64 image at its size (4 merged image tokens)."""
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    ids = tok.convert_tokens_to_ids
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}, pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           num_position_embeddings=64, deepstack_visual_indexes=[1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|endoftext|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
         "size": {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return str(folder)


def build_paper_reward_assets(d):
    """Every tiny model above into the folder `d` (a pathlib.Path): slot -> path (configs saved
    as folders, so the dict also works as --reward-paths)."""
    d.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    sd, _ = released_layout(tiny_config(tok))
    (d / "hpsv3").mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "hpsv3" / "HPSv3.safetensors"))
    tok.save_pretrained(d / "qwen2vl")
    tiny_config(tok).save_pretrained(d / "qwen2vl_config")
    (d / "data_collator_qwen.py").write_text(TEMPLATE)
    return {"geneval_detector": tiny_mask2former(d / "m2f"), "ocr": tiny_florence(d / "florence"),
            "geneval2": tiny_qwen3vl(d / "qwen3vl"),
            "hpsv3": str(d / "hpsv3"), "hpsv3_base": str(d / "qwen2vl"),
            "hpsv3_config": str(d / "qwen2vl_config"), "hpsv3_template": str(d / "data_collator_qwen.py")}
