"""VLM processors for images alone, where transformers builds a family's processor only with its video
half (which needs torchvision, and for SmolVLM2 num2words too). Each is the family's own processor
class, with its own code for images (image tokens, prompt layout), built from the tokenizer, the image
processor and the chat template the model's directory or hub repository holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from lapa_training.vla.backbones import VLABuildError


def _read(where: str, name: str) -> str | None:
    """A file of a model directory or hub repository (the hub cache), or None."""
    from transformers.utils import cached_file

    path = cached_file(where, name, _raise_exceptions_for_missing_entries=False)
    return Path(path).read_text() if path else None


def _parts(where: str, overrides: dict[str, Any] | None):
    """(tokenizer, image processor, chat template) of a model directory or hub repository."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(where)
    images = AutoImageProcessor.from_pretrained(where, **dict(overrides or {}))
    template = tokenizer.chat_template or _read(where, "chat_template.jinja")
    if not template and (text := _read(where, "chat_template.json")):
        template = json.loads(text)["chat_template"]
    if not template:
        raise VLABuildError(f"{where!r} has no chat template (its prompt format)")
    return tokenizer, images, template


# ---------------------------------------------------------------------------------------------
# Qwen2.5-VL
# ---------------------------------------------------------------------------------------------
def qwen_processor_for_images(image_processor, tokenizer, chat_template: str | None):
    """Qwen2.5-VL's processor class without its video processor: each image's tokens from its patch grid,
    and the multimodal token types its rotary positions read."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2_5_VLImageProcessorOnly(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return Qwen2_5_VLImageProcessorOnly(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=chat_template)


def image_only_qwen_processor(where: str, overrides: dict[str, Any] | None = None):
    tokenizer, images, template = _parts(where, overrides)
    return qwen_processor_for_images(images, tokenizer, template)


# ---------------------------------------------------------------------------------------------
# SmolVLM2
# ---------------------------------------------------------------------------------------------
def smolvlm_processor_for_images(image_processor, tokenizer, chat_template: str | None, image_seq_len: int):
    """SmolVLM2's processor class without its video processor (and num2words, which only its video
    prompts use): the image tokens of each view around <fake_token_around_image>, in its chat format."""
    from transformers import SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin

    class SmolVLMImageProcessorOnly(SmolVLMProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_len: int = 169,
                     **kwargs):
            self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
            self.image_token = getattr(tokenizer, "image_token", "<image>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
            self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
            self.image_seq_len = image_seq_len
            self.video_token = getattr(tokenizer, "video_token", "<video>")
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            # SmolVLMProcessor's own reads its video processor's frame settings, for video prompts only
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    return SmolVLMImageProcessorOnly(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=chat_template, image_seq_len=image_seq_len)


def image_only_smolvlm_processor(where: str, overrides: dict[str, Any] | None = None):
    tokenizer, images, template = _parts(where, overrides)
    saved = json.loads(_read(where, "processor_config.json") or "{}")
    seq_len = saved.get("image_seq_len")
    if seq_len is None:  # what the model makes of one view: (side / patch)^2 patches, merged scale^2 at a time
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(where)
        vision = config.vision_config
        seq_len = int((vision.image_size // vision.patch_size) ** 2 / config.scale_factor ** 2)
    return smolvlm_processor_for_images(images, tokenizer, template, int(seq_len))


IMAGE_ONLY: dict[str, Callable[[str, dict[str, Any] | None], Any]] = {
    "qwen2_5_vl": image_only_qwen_processor,
    "smolvlm": image_only_smolvlm_processor,
}
