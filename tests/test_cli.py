"""The CLI and the Python API agree, and print what they promise."""

from __future__ import annotations

import json

import pytest

from nld_trt.cli import main
from nld_trt.tiny import BOS_ID


def cli_json(capsys, *args) -> dict:
    main(list(args))
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("mode", ["ar", "dlm", "linear_spec"])
def test_generate_json_matches_the_python_api(tiny_dir, tiny, capsys, mode):
    out = cli_json(capsys, "generate", "--model", str(tiny_dir), "--mode", mode, "--block-length", "8",
                   "--max-new-tokens", "12", "--json", "Tom has 12 apples.")
    assert set(out) >= {"text", "token_ids", "prompt_token_ids", "stats"}
    assert set(out["stats"]) >= {"tokens", "nfe", "tpf"}
    api = tiny.generate("Tom has 12 apples.", mode=mode, block_length=8, max_new_tokens=12)
    assert out["token_ids"] == api.token_ids and out["prompt_token_ids"] == api.prompt_token_ids
    assert out["text"] == api.text == tiny.tokenizer.decode(api.token_ids)
    assert out["stats"]["tokens"] == len(out["token_ids"]) <= 12
    assert out["stats"]["tpf"] == pytest.approx(out["stats"]["tokens"] / out["stats"]["nfe"], abs=1e-4)


def test_chat_template_is_applied_unless_raw(tiny_dir, tiny, capsys):
    chat = cli_json(capsys, "generate", "--model", str(tiny_dir), "--max-new-tokens", "2", "--json", "hi")
    raw = cli_json(capsys, "generate", "--model", str(tiny_dir), "--max-new-tokens", "2", "--json", "--raw", "hi")
    inst, end_inst = tiny.tokenizer.token_id("[INST]"), tiny.tokenizer.token_id("[/INST]")
    assert chat["prompt_token_ids"][:2] == [BOS_ID, inst] and chat["prompt_token_ids"][-1] == end_inst
    assert raw["prompt_token_ids"] == tiny.tokenizer.encode("hi") and inst not in raw["prompt_token_ids"]


def test_generate_prints_text_then_stats(tiny_dir, capsys):
    main(["generate", "--model", str(tiny_dir), "--mode", "linear_spec", "--max-new-tokens", "6", "hello"])
    captured = capsys.readouterr()
    assert "linear_spec: 6 tokens" in captured.err and "TPF" in captured.err
    assert captured.out.endswith("\n")


def test_info_reports_config_and_parameter_count(tiny_dir, tiny, capsys):
    out = cli_json(capsys, "info", "--model", str(tiny_dir), "--json")
    assert out["model_type"] == "nemotron_labs_diffusion" and out["mask_token_id"] == 100
    assert out["rope_parameters"]["llama_4_scaling_beta"] == 0.1
    assert out["parameters"] == sum(p.numel() for p in tiny.model.parameters())
    assert out["linear_spec_lora"] == {"r": 4, "alpha": 8.0, "layers": 2}


def test_running_out_of_memory_at_load_is_one_line_that_says_what_to_lower(tiny_dir, monkeypatch, capsys):
    """A checkpoint or KV pool too big for the device ends in one line naming the options that shrink it, not a
    traceback; any other error a bug raises still propagates."""
    import torch

    from nld_trt.kv import attend

    def no_room(self, layout, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (GPU 0; 139.80 GiB total)\nmore")

    monkeypatch.setattr(attend.PagedCache, "__init__", no_room)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", str(tiny_dir), "--max-new-tokens", "2", "hi"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "out of memory (CUDA out of memory. Tried to allocate 80.00 GiB" in err and "--max-batch" in err
    assert "--kv-cache-gb" in err

    def bug(self, layout, device):
        raise RuntimeError("a bug, not a lack of memory")

    monkeypatch.setattr(attend.PagedCache, "__init__", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", "--model", str(tiny_dir), "--max-new-tokens", "2", "hi"])


def test_the_cli_starts_without_importing_pytorch():
    """`nld-trt --help` and every command's option parsing stay light: torch is imported by what a command runs,
    not by the CLI module (the KV page size default lives in nld_trt.config for this)."""
    import subprocess
    import sys

    code = ("import sys\nfrom nld_trt.cli import main\ntry:\n    main(['serve', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--page-size" in out and out.strip().splitlines()[-1] == "False"
