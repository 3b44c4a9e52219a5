"""The installed `gemma3n` console script, run as a person runs it (README commands are tested through it).

`pip install -e .` puts the script beside the interpreter; PYTHONPATH makes it import the tree under test
(the same tree in CI, a git worktree during development)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def console_script() -> str:
    script = Path(sys.executable).parent / "gemma3n"
    if not script.exists():
        raise RuntimeError(f"no console script at {script}: install the project (pip install -e '.[test]')")
    return str(script)


def console_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def gemma3n(*args: str, stdin: str | bytes | None = None, timeout: float = 600, env: dict | None = None,
            text: bool = True) -> subprocess.CompletedProcess:
    """Run `gemma3n ARGS...` to completion."""
    return subprocess.run([console_script(), *args], capture_output=True, text=text, input=stdin,
                          timeout=timeout, env=env or console_env())


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    """Start `gemma3n ARGS...` in the background (a server); the caller stops it."""
    return subprocess.Popen([console_script(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env or console_env())
