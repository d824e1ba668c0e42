"""The package builds a wheel that installs and runs in a fresh virtual environment."""

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import convae

ROOT = Path(__file__).resolve().parents[1]


def test_python_m_convae_and_version():
    out = subprocess.run([sys.executable, "-m", "convae", "--version"], capture_output=True, text=True)
    import convae

    assert out.returncode == 0 and out.stdout.strip() == f"convae {convae.__version__}"


def test_the_command_line_starts_without_torchvision_or_pyplot():
    """Both are imported where they are used: together they took more than half of every command's
    start (``convae --version`` 7.1 s against 3.8 s without them)."""
    code = "import sys, convae.cli; print(sorted(m for m in ('torchvision', 'matplotlib.pyplot') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_the_command_exits_with_its_status_and_its_objects_frozen():
    """The interpreter's last garbage collections over torch's objects took 1.4 s after a tiny
    run's "done"; the command freezes them first. A user mistake still exits 2."""
    code = (
        "import atexit, gc, sys; atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); "
        "sys.argv = ['convae'] + sys.argv[1:]; from convae.cli import entry; entry()"
    )
    ok = subprocess.run([sys.executable, "-c", code, "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.split("\n")[1] == "frozen True", ok.stdout + ok.stderr
    bad = subprocess.run(
        [sys.executable, "-c", code, "run", "--data", "/nonexistent/images"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "data source not found" in bad.stderr and "Traceback" not in bad.stderr
    assert "frozen True" in bad.stdout
    assert "entry()" in (Path(convae.__file__).parent / "__main__.py").read_text()  # python -m convae: the same way out


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="needs the source tree")
def test_wheel_builds_and_installs_in_a_fresh_venv(tmp_path):
    # --no-isolation: build with this environment's setuptools, so no download is needed
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheels = list((tmp_path / "dist").glob("convae-*.whl"))
    assert len(wheels) == 1
    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheels[0])], check=True)
    # torch and friends are large: borrow this environment's copies, convae comes from the wheel
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages())}
    where = subprocess.run(
        [py, "-c", "import convae; print(convae.__file__)"], capture_output=True, text=True, env=env, check=True
    ).stdout.strip()
    assert where.startswith(str(env_dir))
    version = subprocess.run([env_dir / "bin" / "convae", "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.startswith("convae ")
    helped = subprocess.run([py, "-m", "convae", "export", "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "--format" in helped.stdout
