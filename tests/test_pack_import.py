"""How the pack enters a ComfyUI process, and the install folder README documents.

Both run in fresh interpreters (subprocesses): ComfyUI imports the pack into a process whose
``sys.path`` and ``sys.modules`` the test process (pytest, conftest, the editable install) has
already changed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

from comfy_double import REPO

# Loads the pack as ComfyUI's nodes.load_custom_node does, after hiding every spare_core the
# environment offers (the editable install's finder, a folder on sys.path): the pack must bring
# its own. Prints what a later custom node could import.
HIDDEN_CORE = r'''
import importlib.util, json, os, sys
pack = sys.argv[1]
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "spare_core"))]
importlib.invalidate_caches()
assert importlib.util.find_spec("spare_core") is None, "could not hide the installed spare_core"
path_before = list(sys.path)
name = pack.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, os.path.join(pack, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
importlib.invalidate_caches()
found = {}
for top in ("tests", "benchmarks", "nodes", "spare_core"):
    spec = importlib.util.find_spec(top)
    found[top] = None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or [])))
print(json.dumps({"mappings": sorted(module.NODE_CLASS_MAPPINGS), "found": found,
                  "spare_core": sys.modules["spare_core"].__file__,
                  "path_added": [p for p in sys.path if p not in path_before],
                  "top_level": sorted(m for m in sys.modules if m in ("tests", "benchmarks", "nodes"))}))
'''


def _inside(path: str | None, folder: str) -> bool:
    if not path:
        return False
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def test_pack_adds_only_spare_core_to_the_host(tmp_path):
    """Without an installed spare_core the pack loads its own under that one name; its tests,
    benchmarks and nodes folders stay unimportable as top-level modules for other packs."""
    out = subprocess.run([sys.executable, "-c", HIDDEN_CORE, REPO], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "ComputeSaliency" in got["mappings"] and "ApplyUnlearnAdapter" in got["mappings"]
    assert os.path.realpath(got["spare_core"]) == os.path.realpath(
        os.path.join(REPO, "spare_core", "__init__.py"))
    assert got["path_added"] == []
    assert got["top_level"] == []
    for top in ("tests", "benchmarks", "nodes"):
        assert not _inside(got["found"][top], REPO), (top, got["found"][top])
    assert _inside(got["found"]["spare_core"], REPO)  # the one name the pack provides


def test_a_clone_named_as_readme_says_runs_its_tests(tmp_path):
    """README installs into ``custom_nodes/spare-unlearn``, a folder name that is no Python
    identifier: pytest run there must not import the root ``__init__.py`` by that name."""
    clone = tmp_path / "custom_nodes" / "spare-unlearn"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache", "demo_out"))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_workflows.py::test_ui_and_api_files_are_the_same_graph",
         "tests/test_workflows.py::test_template_browser_gets_only_ui_files"],
        capture_output=True, text=True, timeout=600, cwd=clone)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    ran = re.search(r"(\d+) passed", out.stdout)  # one per shipped workflow, plus one
    assert ran and int(ran.group(1)) >= 2 and "failed" not in out.stdout, out.stdout[-2000:]
