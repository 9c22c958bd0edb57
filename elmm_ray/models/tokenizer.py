"""Tokenizers: a small BPE trained offline for tiny backbones, or a checkpoint's own.

Either way the prompt needs ``<image>``, ``<readout>`` and ``<inv>`` as special tokens
(single ids that the pre-tokenizer never splits).
"""

from __future__ import annotations

import logging
import os
import string
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
IMAGE_TOKEN = "<image>"
READOUT_TOKEN = "<readout>"
INVERSE_TOKEN = "<inv>"
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    UNK_TOKEN,
    IMAGE_TOKEN,
    READOUT_TOKEN,
    INVERSE_TOKEN,
)
PROMPT_TOKENS: tuple[str, ...] = (IMAGE_TOKEN, READOUT_TOKEN, INVERSE_TOKEN)
_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation + "\u2581"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a lower-cased BPE tokenizer on ``texts`` (deterministic, no network).

    Special tokens take ids 0..6 in the order of :data:`SPECIAL_TOKENS`. The vocabulary
    can come out smaller than ``vocab_size`` on a small corpus; use ``len(tokenizer)``.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} leaves no room beside the special tokens")
    # A word-start marker rather than an end-of-word suffix: the trainer numbers suffixed
    # characters in hash order, which makes the vocabulary differ from run to run.
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="always"), pre_tokenizers.Punctuation()]
    )
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(_ALPHABET),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(PROMPT_TOKENS),
        padding_side="right",
    )


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add the prompt's special tokens (and a pad token) that a checkpoint tokenizer lacks.

    Returns how many tokens were added; the model builder resizes the embeddings.
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in PROMPT_TOKENS if token not in vocab]
    special: dict = {}
    if missing:
        special["extra_special_tokens"] = missing
    if tokenizer.pad_token is None:
        special["pad_token"] = PAD_TOKEN
    if not special:
        return 0
    return tokenizer.add_special_tokens(special, replace_extra_special_tokens=False)


def warn_remote_code(source: str, trust_remote_code: bool) -> bool:
    """``trust_remote_code``, with a warning when it is on (``model.trust_remote_code``)."""
    if trust_remote_code:
        log.warning("model.trust_remote_code is true: %s may run its own Python code on load; "
                    "set it only for a checkpoint you trust", source)
    return bool(trust_remote_code)


def load_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False
                   ) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved with ``save_pretrained`` (or a hub id, from the HF cache);
    a tokenizer class of the checkpoint's own code only with ``trust_remote_code``."""
    from elmm_ray.models.hub import local_first  # a hub id: this node's cache, fetched once

    try:
        return local_first(
            AutoTokenizer.from_pretrained, str(name_or_path),
            trust_remote_code=warn_remote_code(str(name_or_path), trust_remote_code))
    except OSError as error:
        raise OSError(
            f"could not load a tokenizer from {str(name_or_path)!r}: {error}\n"
            "give a directory written by tokenizer.save_pretrained, or a hub id that is "
            "already in the local HF cache"
        ) from error


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of a single special token; a clear error when the tokenizer lacks it."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id and token != UNK_TOKEN:
        raise KeyError(f"tokenizer has no {token!r} token; call prepare_tokenizer first")
    return int(ids[0])
