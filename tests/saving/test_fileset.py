"""corept's saves write only corept's files, atomically per set, and recover from interruptions
(issue 20, items 1 and 7; permissions and dtype names from item 11)."""
from __future__ import annotations

import json
import os

import pytest
import torch

import corept
from corept.saving import fileset
import tiny


@pytest.fixture(scope="module")
def peft_model():
    model = corept.get_peft_model(corept.patch(tiny.tiny_model("llama")), r=4, use_gradient_checkpointing=False)
    return model, tiny.tiny_tokenizer()


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_files(folder):
    (folder / "notes.txt").write_text("my notes")
    (folder / "README.md").write_text("# my project")
    (folder / "src").mkdir(exist_ok=True)
    (folder / "src" / "train.py").write_text("print('mine')")
    return {k: v for k, v in _tree(folder).items()}


def test_save_leaves_every_other_file_alone(peft_model, tmp_path, monkeypatch):
    model, tok = peft_model
    mine = _user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    corept.save(model, tok, ".", method="lora")  # the project folder itself
    after = _tree(tmp_path)
    assert all(after[k] == v for k, v in mine.items()), "a file corept did not write was changed or removed"
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / fileset.MANIFEST).is_file()
    assert after["README.md"] == b"# my project"  # peft's model card never replaces the user's README
    corept.save(model, tok, ".", method="merged_16bit")  # another set: the adapter's files go, the user's stay
    after = _tree(tmp_path)
    assert all(after[k] == v for k, v in mine.items())
    assert not (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "model.safetensors").is_file()
    listed = json.loads((tmp_path / fileset.MANIFEST).read_text())["files"]
    assert set(listed) == set(after) - set(mine) and listed[-1] == fileset.MANIFEST
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".corept")]


@pytest.mark.parametrize("crash_after", [0, 1, 3])
def test_a_crash_mid_commit_is_finished_by_the_next_load(peft_model, tmp_path, monkeypatch, crash_after):
    model, tok = peft_model
    target = tmp_path / "adapter"
    corept.save(model, tok, target, method="lora")
    previous = _tree(target)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(1.0)
    real, calls = os.replace, []

    def dies(src, dst):
        committing = ".corept-staging-" in str(src) and ".corept-staging-" not in str(dst)  # a move into place
        if committing and len(calls) >= crash_after:
            raise KeyboardInterrupt("killed (injected)")
        calls.extend([src] if committing else [])
        return real(src, dst)

    monkeypatch.setattr(fileset.os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        corept.save(model, tok, target, method="lora")
    monkeypatch.setattr(fileset.os, "replace", real)
    assert set(previous) <= set(_tree(target))  # every file of the set is there (old or new bytes)
    assert (target / fileset.JOURNAL).is_file()
    done = fileset.recover(target)
    assert done and "finished an interrupted save" in done[0]
    final = _tree(target)
    assert final["adapter_model.safetensors"] != previous["adapter_model.safetensors"]  # the new save
    assert not (target / fileset.JOURNAL).exists() and not list(target.glob(".corept-staging-*"))


def test_an_interrupted_write_leaves_the_previous_save_and_the_next_save_cleans_up(peft_model, tmp_path, caplog):
    model, tok = peft_model
    target = tmp_path / "adapter"
    corept.save(model, tok, target, method="lora")
    previous = _tree(target)
    stray = target / ".corept-staging-killed"  # what a process killed while writing leaves
    stray.mkdir()
    (stray / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    with caplog.at_level("WARNING", logger="corept"):
        corept.save(model, tok, target, method="lora")
    assert "removed .corept-staging-killed, the unfinished files of an interrupted save" in caplog.text
    assert not stray.exists() and set(_tree(target)) == set(previous)


def test_an_old_style_interrupted_swap_is_restored(tmp_path):
    """The earlier folder-swapping save could be killed between its two renames, leaving no folder
    at the path and the previous save as ``.NAME.old-PID``: recovery puts it back."""
    moved = tmp_path / ".adapter.old-4242"
    moved.mkdir()
    (moved / "adapter_model.safetensors").write_bytes(b"previous")
    (tmp_path / ".adapter.tmp-xyz").mkdir()
    done = fileset.recover(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == b"previous"
    assert len(done) == 2 and not list(tmp_path.glob(".adapter.*"))


def test_saved_folders_have_the_usual_permissions(peft_model, tmp_path):
    model, tok = peft_model
    umask = os.umask(0)
    os.umask(umask)
    target = corept.save(model, tok, tmp_path / "a" / "b", method="lora")
    for folder in (target, target.parent):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (target / "adapter_config.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_merged_dtype_by_name(peft_model, tmp_path):
    model, tok = peft_model
    corept.save(model, tok, tmp_path / "m", method="merged_16bit", dtype="fp16")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float16"
    with pytest.raises(corept.InvalidOptionsError, match="save dtype 'bogus'"):
        corept.save(model, tok, tmp_path / "x", method="merged_16bit", dtype="bogus")
    with pytest.raises(corept.InvalidOptionsError, match="not a folder"):
        (tmp_path / "file").write_text("x")
        corept.save(model, tok, tmp_path / "file", method="lora")
