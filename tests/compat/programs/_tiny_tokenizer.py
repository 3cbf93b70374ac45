"""A word-level tokenizer built locally with the ``tokenizers`` package (nothing downloaded),
wrapped as a transformers fast tokenizer, as a user who trains their own vocabulary does."""

from __future__ import annotations

CORPUS = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog are friends",
    "the mat is red and the log is brown",
    "friends sit on the red mat",
    "a brown dog runs to the cat",
]


def build(**special):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokens = {"unk_token": "[UNK]", "pad_token": "[PAD]", **special}
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(dict.fromkeys(tokens.values())))
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)
