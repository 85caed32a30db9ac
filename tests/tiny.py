"""Tiny offline text stacks for test pipelines (docs/testing.md#tiny-models): in-memory tokenizers and text encoders.

Nothing is downloaded. Every module is built from a config with a fixed seed and put in eval mode (T5 dropout
would otherwise make two identical calls differ).
"""

from __future__ import annotations

import string

import torch

CH = string.ascii_letters + string.digits + ".,!?'-"


def seeded(fn, *args, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    module = fn(*args, **kwargs)
    return module.eval() if isinstance(module, torch.nn.Module) else module


def t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in CH] + [("\u2581" + c, -3.5) for c in CH]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CH.lower():
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def llama_tokenizer():
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "\u2581": 4}
    for c in CH:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault("\u2581" + c, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=[], pad_token="<pad>", model_max_length=256)


def t5_encoder(kind: str = "t5"):
    """A 2-layer T5 (``kind="t5"``) or UMT5 (``kind="umt5"``) encoder with d_model 32."""
    from transformers import T5Config, T5EncoderModel, UMT5EncoderModel

    cfg = T5Config(vocab_size=160, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    cls = UMT5EncoderModel if kind == "umt5" else T5EncoderModel
    return seeded(cls, cfg)


def clip_encoder(hidden: int = 32, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=100, projection_dim=hidden, max_position_embeddings=77, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    return seeded(CLIPTextModelWithProjection if with_projection else CLIPTextModel, cfg)


def llama_encoder():
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                      vocab_size=160, bos_token_id=1, eos_token_id=2, pad_token_id=3, hidden_act="gelu")
    return seeded(LlamaModel, cfg)


def qwen_tokenizer():
    """Byte-level BPE over single bytes (no merges), with a ChatML template (the pipeline applies it)."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)
