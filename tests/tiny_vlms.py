"""Tiny random-weight vision-language models of real families, saved with their processors to a
directory and loaded by path, as transformers' own tests build them: nothing is downloaded.

Each has its family's real model class (AutoModelForImageTextToText), image processor (the PIL
backend) and prompt format; the tokenizer is byte-level with the family's special tokens.
"""

from __future__ import annotations

from pathlib import Path

from lapa_training.vla.backbones import byte_tokenizer

FAMILIES = ("idefics3", "smolvlm", "paligemma", "qwen2_5_vl")
IMAGE_SIZE = 64


def _text(vocab_size: int, **extra) -> dict:
    return {**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512), **extra}


def _vision(**extra) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                image_size=IMAGE_SIZE, patch_size=16, **extra)


# SmolVLM's chat format: "<|im_start|>User:<image>{text}<end_of_utterance>\nAssistant:"
IDEFICS3_CHAT = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
                 "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
                 "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
                 "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def build(family: str, directory: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    if family == "idefics3":
        from transformers import Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor

        tok = byte_tokenizer(["<pad>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                              "<global-img>"], pad_token="<pad>", bos_token="<|im_start|>",
                             eos_token="<end_of_utterance>")
        images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                           max_image_size={"longest_edge": IMAGE_SIZE})
        # (64 / 16)^2 patches, merged 2 x 2 by the connector: 4 image tokens
        processor = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4,
                                      chat_template=IDEFICS3_CHAT)
        config = Idefics3Config(vision_config=_vision(), text_config=dict(model_type="llama", **_text(len(tok)),
                                                                          pad_token_id=0),
                                scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                tie_word_embeddings=False)
    elif family == "smolvlm":  # SmolVLM2
        from transformers import SmolVLMConfig, SmolVLMImageProcessorPil

        tok = byte_tokenizer(["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                              "<image>", "<global-img>"], pad_token="<|endoftext|>", bos_token="<|im_start|>",
                             eos_token="<end_of_utterance>")
        images = SmolVLMImageProcessorPil(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                          max_image_size={"longest_edge": IMAGE_SIZE})
        config = SmolVLMConfig(vision_config=_vision(), text_config=dict(model_type="llama", **_text(len(tok)),
                                                                         pad_token_id=0),
                               scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
                               tie_word_embeddings=False)
        # transformers builds SmolVLM2's processor only with torchvision and num2words (its video half): the
        # files its hub repository holds instead, which the backbone reads into its image-only processor
        processor = None
        tok.save_pretrained(directory)
        images.save_pretrained(directory)
        (directory / "chat_template.jinja").write_text(IDEFICS3_CHAT)
        (directory / "processor_config.json").write_text('{"image_seq_len": 4, "processor_class": "SmolVLMProcessor"}')
    elif family == "paligemma":
        from transformers import PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessorPil

        tok = byte_tokenizer(["<pad>", "<bos>", "<eos>", "<image>"], pad_token="<pad>", bos_token="<bos>",
                             eos_token="<eos>")
        images = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        images.image_seq_length = (IMAGE_SIZE // 16) ** 2
        processor = PaliGemmaProcessor(image_processor=images, tokenizer=tok)  # adds its location tokens
        config = PaliGemmaConfig(vision_config=_vision(projection_dim=32),
                                 text_config=_text(len(tok), head_dim=8, num_key_value_heads=1),
                                 image_token_id=tok.convert_tokens_to_ids("<image>"), projection_dim=32)
        config.vision_config.num_image_tokens = images.image_seq_length
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2VLImageProcessorPil

        tok = byte_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                              "<|image_pad|>", "<|video_pad|>"], pad_token="<|endoftext|>", eos_token="<|im_end|>")
        # every frame resized to 56 x 56 px: 4 x 4 patches of 14, merged 2 x 2: 4 image tokens
        images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
        ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in ("image_pad", "video_pad", "vision_start")}
        config = Qwen2_5_VLConfig(
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                               fullatt_block_indexes=[0]),
            text_config=_text(len(tok), rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
            image_token_id=ids["image_pad"], video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"])
        # transformers builds Qwen2.5-VL's processor only with torchvision (its video half): the files a hub
        # repository holds instead, which the backbone reads into its image-only processor
        processor = None
        tok.save_pretrained(directory)
        images.save_pretrained(directory)
        (directory / "chat_template.jinja").write_text(QWEN_CHAT)
    else:
        raise ValueError(f"no tiny {family}")
    model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(directory)
    if processor is not None:
        processor.save_pretrained(directory)
    return directory


QWEN_CHAT = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
             "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}"
             "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
             "{% endif %}")
