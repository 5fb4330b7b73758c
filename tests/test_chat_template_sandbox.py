"""A checkpoint's chat template runs in transformers' Jinja sandbox: a hostile one is stopped before anything
runs, and the CLI says so in one line (the server answers the same message); a template that refuses the
conversation, or is not valid Jinja, gets a one-line error too."""

from __future__ import annotations

import shutil

import pytest

from nld_trt.errors import CheckpointError, GenerationError
from nld_trt.tokenizer import NLDTokenizer

HOSTILE = "{{ cycler.__init__.__globals__.os.system('touch WITNESS') }}"


@pytest.fixture()
def ckpt(tiny_dir, tmp_path):
    return shutil.copytree(tiny_dir, tmp_path / "ckpt")


def cli(capsys, *args) -> tuple[int, str]:
    from nld_trt.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code, capsys.readouterr().err


def test_a_hostile_template_is_refused_in_one_line_and_nothing_runs(ckpt, tmp_path, capsys):
    witness = tmp_path / "ran"
    (ckpt / "chat_template.jinja").write_text(HOSTILE.replace("WITNESS", str(witness)))
    code, err = cli(capsys, "generate", "--model", str(ckpt), "--max-new-tokens", "2", "hi")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("Error: ") and "sandbox" in err and "nothing ran" in err and "SecurityError" in err
    assert "__init__" in err  # what it tried
    assert not witness.exists()
    with pytest.raises(CheckpointError, match="forbids"):
        NLDTokenizer(ckpt).encode_chat([{"role": "user", "content": "hi"}])


def test_a_template_that_refuses_the_conversation_says_why(ckpt, capsys):
    (ckpt / "chat_template.jinja").write_text("{{ raise_exception('only user and assistant roles') }}")
    code, err = cli(capsys, "generate", "--model", str(ckpt), "--max-new-tokens", "2", "hi")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "only user and assistant roles" in err
    with pytest.raises(GenerationError, match="the chat template refused"):
        NLDTokenizer(ckpt).apply_chat_template([{"role": "user", "content": "hi"}])


def test_a_template_that_is_not_valid_jinja_is_named(ckpt, capsys):
    (ckpt / "chat_template.jinja").write_text("hello\n{% if %}")
    code, err = cli(capsys, "generate", "--model", str(ckpt), "--max-new-tokens", "2", "hi")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "not valid Jinja" in err and "line 2" in err


@pytest.mark.parametrize(("template", "error"), [("{{ 1 / 0 }}", "ZeroDivisionError"),
                                                  ("{% for i in range(10 ** 9) %}x{% endfor %}", "OverflowError")])
def test_a_template_that_fails_while_rendering_is_named(ckpt, capsys, template, error):
    (ckpt / "chat_template.jinja").write_text(template)
    code, err = cli(capsys, "generate", "--model", str(ckpt), "--max-new-tokens", "2", "hi")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"chat template failed ({error}" in err
