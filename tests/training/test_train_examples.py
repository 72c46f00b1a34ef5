"""examples/sft.py, dpo.py, kto.py and grpo.py run end to end (tiny built-in model, two steps each)."""
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("name", ["sft", "dpo", "kto", "grpo"])
def test_example_runs(name, tmp_path, corept_env):
    out = tmp_path / name
    proc = subprocess.run([sys.executable, "-P", str(EXAMPLES / f"{name}.py"), "--tiny", "--max-steps", "2",
                           "--output", str(out)], env=corept_env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"adapter: {out / 'adapter'}" in proc.stdout and f"merged:  {out / 'merged'}" in proc.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "model.safetensors").is_file()
    assert not (out / "adapter" / "ref").exists()  # the reference was the disabled adapter, not a saved copy


def test_sft_example_under_torchrun(tmp_path, corept_env):
    """Two gloo ranks (DDP): the example trains and rank 0 alone writes the adapter."""
    out = tmp_path / "sft"
    proc = subprocess.run([sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(EXAMPLES / "sft.py"), "--tiny", "--max-steps", "2", "--output", str(out)],
                          env=corept_env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert proc.stdout.count(f"adapter: {out / 'adapter'}") == 1, proc.stdout[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
