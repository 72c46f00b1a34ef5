"""corept.loading.names: a name becomes a local folder (local path, plugin alias, HF cache), offline."""
from __future__ import annotations

import os

import pytest

import corept
from corept.loading.names import offline, resolve_model_path
import tiny


def test_hub_offline_is_set_for_the_tests():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and offline()
    import huggingface_hub.constants as c

    assert c.HF_HUB_OFFLINE


def test_local_folder(tiny_folders):
    folder, how = resolve_model_path(str(tiny_folders["llama"]))
    assert folder == tiny_folders["llama"].resolve() and how == "local folder"


def test_folder_without_config(tmp_path):
    with pytest.raises(corept.ModelNotFoundError, match="holds no config.json"):
        resolve_model_path(str(tmp_path))


@pytest.mark.parametrize("name", ["./missing-model", "/no/such/folder", "~/no-such-model", "models/tiny/missing"])
def test_path_like_name_that_does_not_exist(name):
    with pytest.raises(corept.ModelNotFoundError, match="looks like a path"):
        resolve_model_path(name)


def test_repo_id_in_the_cache(hub_cache):
    folder, how = resolve_model_path("unsloth/Qwen3-8B", cache_dir=hub_cache)
    assert how == "HF cache"
    assert folder == hub_cache / "models--unsloth--Qwen3-8B" / "snapshots" / ("1" * 40)
    assert tiny.config_json(folder)["model_type"] == "qwen3"


def test_alias_is_case_insensitive_and_says_so(hub_cache):
    folder, how = resolve_model_path("Qwen3-8B", cache_dir=hub_cache)
    assert folder == hub_cache / "models--Qwen--Qwen3-8B" / "snapshots" / ("2" * 40)
    assert how == "alias of Qwen/Qwen3-8B (HF cache)"


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-7B", "qwen2.5-7b"])
def test_dotted_hub_ids_and_aliases_are_names_not_paths(hub_cache, name):
    folder, how = resolve_model_path(name, cache_dir=hub_cache)
    assert folder == hub_cache / "models--Qwen--Qwen2.5-7B" / "snapshots" / ("5" * 40)
    assert how in ("HF cache", "alias of Qwen/Qwen2.5-7B (HF cache)")


def test_alias_whose_target_is_not_cached(hub_cache):
    with pytest.raises(corept.ModelNotFoundError, match="'meta-llama/Llama-3.1-8B'.*HF_HUB_OFFLINE"):
        resolve_model_path("llama-3.1-8b", cache_dir=hub_cache)


def test_name_that_is_nowhere(hub_cache):
    with pytest.raises(corept.ModelNotFoundError) as info:
        resolve_model_path("nobody/nothing", cache_dir=hub_cache)
    msg = str(info.value)
    assert "'nobody/nothing'" in msg and "HF_HUB_OFFLINE" in msg and "not in the HF cache" in msg


def test_cached_repo_without_config(tmp_path):
    repo = tmp_path / "models--acme--empty"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("3" * 40)
    (repo / "snapshots" / ("3" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("3" * 40) / "README.md").write_text("no config here")
    with pytest.raises(corept.ModelNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model_path("acme/empty", cache_dir=tmp_path)
