"""Byte-level BPE tokenizer (via the `tokenizers` library) built from a GGUF file or a Hugging Face directory,
with the model's own Jinja chat template rendered in a sandbox."""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers import models as tok_models

from models.config import ModelConfig

if TYPE_CHECKING:
    from models.gguf import GGUFFile

# llama.cpp token types
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _digits_then_bytes() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


# `tokenizer.ggml.pre` value → pre-tokenizer. Others (llama-bpe, qwen2, ...) use different split regexes.
_PRE_TOKENIZERS = {
    "smollm": _digits_then_bytes,
    "starcoder": _digits_then_bytes,
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
}


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _compile_template(source: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class Tokenizer:
    """Text ↔ token ids, plus chat formatting. Build with `from_gguf` or `from_files`."""

    def __init__(self, tok: tokenizers.Tokenizer, bos_id: int | None, eos_ids: Sequence[int],
                 chat_template: str | None = None) -> None:
        self._tok = tok
        self.bos_id = bos_id
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.chat_template = chat_template
        self._template: Any = None
        n = self.vocab_size
        for i in ([bos_id] if bos_id is not None else []) + list(self.eos_ids):
            if not 0 <= i < n:
                raise ValueError(f"special token id {i} is outside the vocabulary (size {n})")

    # ---------------------------------------------------------------------------------------------- builders
    @classmethod
    def from_gguf(cls, gguf_file: GGUFFile) -> Tokenizer:
        """Rebuild the byte-level BPE stored in `tokenizer.ggml.*`; control tokens become special tokens."""
        meta = gguf_file.metadata
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r}; only byte-level BPE ('gpt2') "
                             "is supported")
        pre = meta.get("tokenizer.ggml.pre")
        if pre not in _PRE_TOKENIZERS:
            raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(_PRE_TOKENIZERS)} "
                             "(load the model's Hugging Face tokenizer.json instead)")
        tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
        merges_raw: list[str] = meta.get("tokenizer.ggml.merges") or []
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
        if not tokens or not merges_raw:
            raise ValueError("GGUF file has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
        if len(types) != len(tokens):
            raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            seen: set[str] = set()
            dup = next(t for t in tokens if t in seen or seen.add(t))
            raise ValueError(f"tokenizer.ggml.tokens has duplicate entries, e.g. {dup!r}")
        merges = []
        for m in merges_raw:
            pair = m.split(" ")
            if len(pair) != 2:
                raise ValueError(f"malformed BPE merge {m!r} (expected two tokens separated by one space)")
            merges.append((pair[0], pair[1]))

        bpe = tok_models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
        tok = tokenizers.Tokenizer(bpe)
        tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
        tok.decoder = decoders.ByteLevel()
        special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                   if k == TOKEN_CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
                if k == TOKEN_USER_DEFINED]
        tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)

        eos_ids = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
            if key in meta and int(meta[key]) not in eos_ids:
                eos_ids.append(int(meta[key]))
        bos = meta.get("tokenizer.ggml.bos_token_id")
        return cls(tok, None if bos is None else int(bos), eos_ids, meta.get("tokenizer.chat_template"))

    @classmethod
    def from_files(cls, directory: str | Path) -> Tokenizer:
        """Load a Hugging Face `tokenizer.json` (+ `tokenizer_config.json`, `generation_config.json`)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        tok = tokenizers.Tokenizer.from_file(str(path))
        cfg = _read_json(directory / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        jinja_file = directory / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()

        def token_id(entry: Any) -> int | None:
            text = entry.get("content") if isinstance(entry, Mapping) else entry
            if text is None:
                return None
            tid = tok.token_to_id(text)
            if tid is None:
                raise ValueError(f"special token {text!r} from tokenizer_config.json is not in the "
                                 "vocabulary")
            return tid

        bos_id = token_id(cfg.get("bos_token"))
        eos_ids: list[int] = []
        eos = token_id(cfg.get("eos_token"))
        if eos is not None:
            eos_ids.append(eos)
        gen_eos = _read_json(directory / "generation_config.json").get("eos_token_id")
        for i in gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else []):
            if int(i) not in eos_ids:
                eos_ids.append(int(i))
        return cls(tok, bos_id, eos_ids, template)

    # ----------------------------------------------------------------------------------------------- methods
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added/special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it (e.g. `<|im_start|>`) map to their single id."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless `skip_special=False`."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:8]}")
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render `messages` ([{role, content}]) with the model's chat template (ChatML if none is stored)."""
        if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
            raise TypeError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(
                    m.get("content"), str):
                raise TypeError(f"message #{i} must be a dict with str 'role' and 'content', got {m!r}")
        if self._template is None:
            self._template = _compile_template(self.chat_template or CHATML_TEMPLATE)
        special = {
            "bos_token": self.id_to_token(self.bos_id) if self.bos_id is not None else "",
            "eos_token": self.id_to_token(self.eos_ids[0]) if self.eos_ids else "",
        }
        return self._template.render(messages=[dict(m) for m in messages],
                                     add_generation_prompt=add_generation_prompt, **{**special, **kwargs})

    def check_vocab(self, config: ModelConfig, allow_padding: bool = False) -> None:
        """Raise when the tokenizer and the model disagree on the vocabulary size.

        `allow_padding=True` accepts a model embedding larger than the tokenizer (padded vocabularies).
        """
        n, m = self.vocab_size, config.vocab_size
        if n == m or (allow_padding and n < m):
            return
        raise ValueError(f"tokenizer vocabulary ({n} tokens) does not match model {config.name!r} "
                         f"vocab_size ({m}); the tokenizer belongs to a different model")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data
