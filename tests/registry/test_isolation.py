"""Plugin discovery isolates each plugin (issue 20, items 4-6).

A plugin that fails in any way (a misspelled hook, a bad registration, ``SystemExit`` or
``KeyboardInterrupt`` from its import) is skipped with a reason that ``corept plugins`` and
``corept doctor`` show; the shipped plugins keep patching, now and in later calls. Two
distributions with one plugin name are a conflict: neither loads, and both show. Misspelled
names in ``COREPT_PLUGINS`` are warned about, and an out-of-range plugin never blocks an in-range
one for the same model type. Each scenario runs in its own subprocess with real installed
distributions (:mod:`plugin_factory`).
"""
from __future__ import annotations

import pytest

from plugin_factory import make_plugin, ok, run_scripts

BROKEN = {
    "typo": '''
import corept

@corept.hookimpl
def corept_register_architectures():
    return []

@corept.hookimpl
def corept_patch_nrom(arch, module, model):
    return None
''',
    "badreg": '''
import corept

@corept.hookimpl
def corept_register_architectures():
    return ["llama"]
''',
    "sysexit": '''
raise SystemExit("sysexit plugin refuses to start")
''',
    "ctrlc": '''
raise KeyboardInterrupt
''',
}

SAME_NAME = '''
from corept import Architecture, ArchitecturePlugin, ModuleRoles
plugin = ArchitecturePlugin([Architecture("llama", ModuleRoles.standard("Llama"))])
'''

OLD_BUT_PREFERRED = '''
from corept import Architecture, ArchitecturePlugin, ModuleRoles
plugin = ArchitecturePlugin([Architecture("llama", ModuleRoles.standard("Llama"), transformers="<5.0", priority=5)])
'''

SCRIPT = '''
import corept, tiny
from corept.cli import doctor, plugins_cmd
logs = capture_logs("corept", logging.WARNING)
out = {"reports": []}
for attempt in range(2):  # a later call sees the same, never a half-loaded manager
    model = corept.patch(tiny.tiny_model("llama"))
    out["reports"].append(corept.report(model).to_dict())
pm = corept.get_plugin_manager()
out["records"] = {key: r.to_dict() for key, r in pm.records.items()}
out["plugins"] = plugins_cmd.collect(include_builtin=True)
out["problems"] = doctor.collect()["problems"]
out["logs"] = logs
emit(out)
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isolation")
    broken = {name: make_plugin(tmp, name, src) for name, src in BROKEN.items()}
    twin_a = make_plugin(tmp, "llamatwin", SAME_NAME, attr="plugin", entry="llama")  # a second plugin named llama
    old = make_plugin(tmp, "oldplus", OLD_BUT_PREFERRED, attr="plugin")
    jobs = {name: dict(code=SCRIPT, site=[site]) for name, site in broken.items()}
    jobs["cli_typo"] = dict(args=["-m", "corept", "plugins"], site=[broken["typo"]])
    jobs["doctor_typo"] = dict(args=["-m", "corept", "doctor"], site=[broken["typo"]])
    jobs["same_name"] = dict(code=SCRIPT, site=[twin_a])
    jobs["old_preferred"] = dict(code=SCRIPT, site=[old])
    jobs["misspelled_env"] = dict(code=SCRIPT, env={"COREPT_PLUGINS": "lama,qwen", "COREPT_DISABLE_PLUGINS": "gema"})
    return dict(zip(jobs, run_scripts(list(jobs.values()))))


@pytest.mark.parametrize("name, reason", [
    ("typo", "corept_patch_nrom"),
    ("badreg", "must return Architecture objects"),
    ("sysexit", "SystemExit: sysexit plugin refuses to start"),
    ("ctrlc", "KeyboardInterrupt"),
])
def test_a_broken_plugin_is_skipped_with_its_reason(runs, name, reason):
    data = ok(runs[name])
    rec = data["records"][name]
    assert not rec["loaded"] and reason in rec["error"], rec
    assert f"COREPT_DISABLE_PLUGINS={name}" in " ".join(data["logs"])
    for report in data["reports"]:  # the shipped plugins keep patching, in every call
        assert report["plugin"] == "llama" and {"norm", "mlp", "rope", "loss"} <= set(report["applied"]), report
    assert any(name in p and reason in p for p in data["problems"]), data["problems"]
    shown = {r["name"]: r for r in data["plugins"]}
    assert shown[name]["error"] == rec["error"]


def test_cli_shows_the_broken_plugin_and_carries_on(runs):
    plugins, doctor = runs["cli_typo"], runs["doctor_typo"]
    assert plugins.returncode == 0, plugins.explain()
    assert "typo" in plugins.stdout and "NOT LOADED" in plugins.stdout and "corept_patch_nrom" in plugins.stdout
    assert "llama" in plugins.stdout
    assert doctor.returncode == 0 and "corept_patch_nrom" in doctor.stdout, doctor.explain()


def test_two_distributions_with_one_plugin_name_are_a_conflict(runs):
    data = ok(runs["same_name"])
    twins = [r for r in data["plugins"] if r["name"] == "llama"]
    assert len(twins) == 2 and all(not r["loaded"] and "plugin name conflict" in r["error"] for r in twins), twins
    assert any("plugin name conflict: 'llama'" in p for p in data["problems"]), data["problems"]
    assert data["reports"][0]["plugin"] is None  # neither silently wins: llama models stay unpatched, said


def test_misspelled_env_names_are_warned_about(runs):
    data = ok(runs["misspelled_env"])
    problems = " ".join(data["problems"])
    assert "COREPT_PLUGINS names ['lama']" in problems and "COREPT_DISABLE_PLUGINS names ['gema']" in problems
    assert "check the spelling" in " ".join(data["logs"])


def test_an_out_of_range_plugin_never_blocks_an_in_range_one(runs):
    data = ok(runs["old_preferred"])
    assert data["reports"][0]["plugin"] == "llama" and data["reports"][0]["applied"], data["reports"][0]
    assert any("oldplus" in p and "'<5.0'" in p and "load unpatched" in p for p in data["problems"]), data["problems"]


def test_doctor_reports_an_invalid_transformers_range():
    import corept
    from corept.cli import doctor

    plugin = corept.ArchitecturePlugin([corept.Architecture("badrange", corept.ModuleRoles.standard("BadRange"),
                                                            transformers="version five or so")])
    corept.register_plugin(plugin, "badrange")
    try:
        problems = doctor.collect()["problems"]
    finally:
        corept.unregister_plugin("badrange")
    assert any("badrange" in p and "invalid version range 'version five or so'" in p for p in problems), problems
