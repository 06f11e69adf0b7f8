"""Text in the HTTP server: prompts tokenized here, token strings for log-probs."""

from __future__ import annotations

from pathlib import Path


class TextCodec:
    """The checkpoint's `tokenizer.json`, as the server needs it."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._token_text: dict[int, str] = {}

    @classmethod
    def load(cls, model_dir: str | None) -> TextCodec | None:
        if not model_dir or not (Path(model_dir) / "tokenizer.json").is_file():
            return None
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._token_text) < 1 << 20:
                self._token_text[token_id] = text
        return text
