"""The byte-level tokenizer of ``hybridnorm-train``'s text runs, as a Hugging Face tokenizer:
token id = byte value (0-255), so text round-trips through UTF-8 bytes. The byte 0 (NUL), which
text does not contain, stands for the beginning/end of a text and for padding (tools such as
lm-evaluation-harness ask for one)."""

from __future__ import annotations


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what byte-level BPE vocabularies
    hold)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per byte, ids equal to the byte values."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _bytes_to_unicode()
    vocab = {c: b for b, c in chars.items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    nul = chars[0]
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   bos_token=nul, eos_token=nul, pad_token=nul)
