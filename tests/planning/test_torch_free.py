"""Planning never imports torch: `fedpipe plan` runs on a machine without it, in a second or so.

Checked in a fresh interpreter (this one has torch loaded by other tests): import every module of
``fedpipe.planning``, plan the default cluster through the CLI, then look at ``sys.modules``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]

PROBE = """
import importlib, json, pkgutil, sys
import fedpipe.planning
from fedpipe.cli import app

modules = [m.name for m in pkgutil.walk_packages(fedpipe.planning.__path__, "fedpipe.planning.")]
for name in modules:
    importlib.import_module(name)
app(["plan", "profiles/cluster.yaml", "-o", sys.argv[1]], standalone_mode=False)
print(json.dumps({"modules": modules, "torch": "torch" in sys.modules}))
"""


def test_planning_and_fedpipe_plan_leave_torch_out(tmp_path):
    out = tmp_path / "cluster.plan.yaml"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDPIPE_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", PROBE, str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"fedpipe.planning.problem", "fedpipe.planning.milp", "fedpipe.planning.decompose",
            "fedpipe.planning.planner", "fedpipe.planning.sweep"} <= set(result["modules"])
    assert out.is_file()
    assert result["torch"] is False, "a planning import pulled in torch"
