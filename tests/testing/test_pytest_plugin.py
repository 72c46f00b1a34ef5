"""corept's pytest plugin (``pytest11`` entry point): the ``corept_progress`` fixture."""
import subprocess
import sys

TEST = '''
def test_long(corept_progress):
    print("captured, not shown")
    corept_progress("step one of a long test")
'''


def test_progress_lines_pass_capture_and_quiet_mode(tmp_path):
    (tmp_path / "test_long.py").write_text(TEST)
    run = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "[step one of a long test]" in run.stdout and "captured, not shown" not in run.stdout, run.stdout
