"""A tiny SigLIP checkpoint folder built locally: random SiglipModel + a sentencepiece tokenizer.

Shaped like google/siglip-so400m-patch14-384 on the hub (config.json, model.safetensors,
spiece.model, tokenizer_config.json), so `from_pretrained` loads it exactly as it loads the real
checkpoint; nothing is downloaded. The tokenizer is a unigram sentencepiece model trained here on
a few land-cover phrases.
"""

from __future__ import annotations

import io
from pathlib import Path

CORPUS = [
    "solar farm panels", "forest river trees", "city roads and buildings", "water lake sea coast",
    "desert sand dunes", "crop fields farmland", "snow ice glacier mountain", "airport runway",
]


def tiny_siglip_checkpoint(folder: Path, seed: int = 0) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import SiglipConfig, SiglipModel, SiglipTokenizer

    from majortom_assets.models.siglip import SIGLIP_TINY_CONFIG, SIGLIP_TINY_TEXT_CONFIG

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=64, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    tokenizer = SiglipTokenizer(vocab_file=str(folder / "spiece.model"))
    tokenizer.save_pretrained(folder)
    text = {**SIGLIP_TINY_TEXT_CONFIG, "vocab_size": 64}
    torch.manual_seed(seed)
    SiglipModel(SiglipConfig(text_config=text, vision_config=SIGLIP_TINY_CONFIG)).save_pretrained(folder)
    return folder
