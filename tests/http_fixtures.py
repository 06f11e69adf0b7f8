"""A node on its own event loop thread, an HTTP server process in front of it, and a local
Llama-3-style tokenizer (byte-level BPE, header tokens, the Llama 3 chat template)."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from greenroom.config import load_config
from greenroom.http.launcher import HttpServer
from greenroom.http.settings import HttpSettings
from greenroom.models.tiny import tiny_llama_dir
from greenroom.node import Node

# ids 0..4, so the tiny model's bos (1) and eos (2) are <|begin_of_text|> and <|eot_id|>
SPECIAL_TOKENS = [
    "<|end_of_text|>",
    "<|begin_of_text|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
]

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how are you today? I am fine, thank you.",
    "You are a helpful assistant. Answer the question briefly.",
    "What is the capital of France? Paris is the capital of France.",
    "system user assistant tool 0123456789 (){}[]<>:;,.!?'\"-_+=*/",
] * 20


def llama3_style_tokenizer(vocab_size: int = 480) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 1)]
    )
    return tok


def chat_model_dir(path: Path, template: str | None = LLAMA3_TEMPLATE) -> Path:
    """The embedded tiny model with a Llama-3-style tokenizer (and chat template) beside it."""
    shutil.copytree(tiny_llama_dir(), path)
    llama3_style_tokenizer().save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
    }
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


class NodeThread:
    """A node running on an event loop in a background thread (tests stay synchronous)."""

    def __init__(self, overrides: dict) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        cfg = load_config(overrides={"port": 0, "log_stats_interval_s": 0, **overrides})
        self.cfg = cfg
        self.node: Node = self.call(Node.start(cfg))

    def call(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_running():
            self.call(self.node.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def start_http(node: Node, model_path: str | None, workers: int = 1, **kw) -> HttpServer:
    settings = HttpSettings(node_address=node.address, model_path=model_path, **kw)
    server = HttpServer.start(settings, "127.0.0.1", 0, workers)
    try:
        asyncio.run(server.wait_ready())
    except BaseException:
        server.stop()
        raise
    return server
