"""Text in and out through a checkpoint's `tokenizer.json` (the `tokenizers` library).

    tok = jmoe.hf.tokenizer.load("hf_dir")
    ids = tok.encode("def main(")      # list[int]
    text = tok.decode(ids)
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from tokenizers import Tokenizer as _Tokenizer


class Tokenizer:
    """A `tokenizers.Tokenizer` with the checkpoint's BOS/EOS ids (from config.json)."""

    def __init__(self, tok: _Tokenizer, bos_id: Optional[int] = None,
                 eos_id: Optional[int] = None):
        self.tok, self.bos_id, self.eos_id = tok, bos_id, eos_id

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; `add_bos` puts the BOS id first unless the
        tokenizer's own post-processor already did."""
        ids = self.tok.encode(text).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(map(int, ids)), skip_special_tokens=True)


def load(path: str) -> Tokenizer:
    """The tokenizer of an HF directory (its tokenizer.json)."""
    fpath = os.path.join(path, "tokenizer.json")
    if not os.path.exists(fpath):
        raise FileNotFoundError(
            f"{path} has no tokenizer.json: jmoe.hf reads fast tokenizers only (save one with "
            "transformers' AutoTokenizer.from_pretrained(...).save_pretrained(dir)).")
    bos = eos = None
    cfg = os.path.join(path, "config.json")
    if os.path.exists(cfg):
        with open(cfg) as f:
            raw = json.load(f)
        bos, eos = raw.get("bos_token_id"), raw.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
    return Tokenizer(_Tokenizer.from_file(fpath), bos, eos)
