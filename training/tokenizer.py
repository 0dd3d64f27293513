"""A small byte-level BPE tokenizer trained locally, with the Qwen2-VL special tokens and chat template.

Tests and CPU smoke runs cannot download Qwen's tokenizer, so they train a few-hundred-token BPE on a
corpus of strings with `tokenizers`. It is byte-level (any text round-trips), carries the same special
tokens as Qwen2-VL (so the processor and the model's ``image_token_id`` work unchanged) and renders
conversations exactly like Qwen2-VL's template, plus ``{% generation %}`` markers so TRL can restrict the
SFT loss to the assistant turn.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# The Qwen2-VL special tokens, in the order they get ids 0..6 in a locally trained vocabulary.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL-Instruct's chat template, rendered text identical for text/image messages, with two additions:
# - `{% generation %}` around each assistant turn (its text and <|im_end|>), so SFT can use
#   `assistant_only_loss=True` and the model still learns to stop;
# - image blocks are recognised by `type` only: rows stored in a `datasets.Dataset` get every key of every
#   block (an image block arrives as {"type": "image", "text": None}), so key-presence tests would misfire.
_CONTENT_BLOCKS = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['text'] is not none %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
)
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    # Jinja needs the generation block closed inside the same branch, so the content renders in both.
    "{% if message['role'] == 'assistant' %}{% generation %}" + _CONTENT_BLOCKS + "<|im_end|>{% endgeneration %}"
    "{% else %}" + _CONTENT_BLOCKS + "<|im_end|>{% endif %}"
    # transformers compiles templates with trim_blocks, which eats a literal newline after a tag.
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Enough radiology and chat text that a tiny vocabulary learns useful merges even with no extra corpus.
BASE_CORPUS: tuple[str, ...] = (
    "system user assistant You are a helpful assistant.",
    "<think>The lungs are clear. There is no pleural effusion.</think><answer>B</answer>",
    "<think>The cardiac silhouette is enlarged, consistent with cardiomegaly.</think><answer>A</answer>",
    "Does this chest X-ray show pleural effusion? Options: A) Yes B) No",
    "Which finding is in this chest X-ray? A) Edema B) Pneumothorax C) Fracture D) Atelectasis",
    "Which findings are in this chest X-ray? A) Edema, Consolidation B) Cardiomegaly, Lung Opacity",
    "Given a reference image and a new image, what is the progression of pneumonia? "
    "A) stable B) worsening C) improving",
    "Atelectasis Cardiomegaly Consolidation Edema Enlarged Cardiomediastinum Fracture Lung Lesion "
    "Lung Opacity Pleural Effusion Pneumonia Pneumothorax Support Devices No Finding",
    "Think step by step. Put your reasoning inside <think></think> and your final answer inside "
    "<answer></answer>.",
    "There is a small left basilar opacity which may represent atelectasis or pneumonia.",
    "No focal consolidation, pleural effusion or pneumothorax. The heart size is normal.",
    "Mild pulmonary vascular congestion and interstitial edema, unchanged from the prior study.",
    "A right internal jugular catheter terminates in the mid superior vena cava.",
    "0 1 2 3 4 5 6 7 8 9 , . ; : ( ) ? ! - / \n",
)


def train_bpe_tokenizer(
    corpus: Iterable[str] = (),
    vocab_size: int = 512,
    min_frequency: int = 1,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``BASE_CORPUS`` plus ``corpus`` and wrap it as a transformers tokenizer.

    Special tokens get ids 0..6 (order of ``SPECIAL_TOKENS``); ``vocab_size`` includes them and the 256
    byte symbols, so it must exceed 263.
    """
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS) + 256} (specials + byte alphabet)")
    backend = Tokenizer(models.BPE())
    # Byte-level: every string maps to bytes first, so nothing is ever unknown and decode(encode(x)) == x.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [*BASE_CORPUS, *corpus]
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return wrap_tokenizer(backend)


def wrap_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` with Qwen2-VL-Instruct's conventions: eos <|im_end|>, pad <|endoftext|>, no bos."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (IM_END, ENDOFTEXT)],
        # Left padding is what batched generation needs; the SFT collator asks for right padding explicitly.
        padding_side="left",
        chat_template=QWEN2VL_CHAT_TEMPLATE,
        model_max_length=32768,
    )
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return directory


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a saved tokenizer (ours or a real checkpoint's) from a local folder, never from the network."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
