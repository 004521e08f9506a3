"""The pack is ready for the Comfy Registry (what ComfyUI-Manager installs from).

1. pyproject.toml holds the fields the Registry reads, read the way comfy-cli's own reader reads
   them (``comfy_cli/registry/config_parser.py: extract_node_configuration``, comfy-cli 1.23.0:
   ``[project]`` name and version, ``[project.urls]`` Repository, ``[tool.comfy]`` PublisherId,
   DisplayName and Icon) and checked against the Registry's specification
   (https://docs.comfy.org/registry/specifications). ``comfy node validate`` only fails on an
   empty version, so this test is the check that the other fields are there and well formed.
   comfy-cli is not imported: it is not a test dependency (README, "Install and run", gives the
   ``comfy node validate`` command).
2. Nothing the Registry's standards forbid: no ``eval``/``exec`` (the ruff rules S307/S102 that
   ``comfy node validate`` runs over the repository, plus E702, several statements on one line,
   which it warns will become an error), and no package installs at run time (no subprocess,
   os.system/popen/exec*/spawn*, pip or ensurepip in the code ComfyUI imports).
"""
from __future__ import annotations

import ast
import io
import os
import re
import sys
import tokenize
from urllib.parse import urlparse

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as a package
    tomllib = pytest.importorskip("tomli")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_CODE = ("__init__.py", "nodes", "spare_core")  # what ComfyUI imports from the pack folder

# Registry spec, [project] name: under 100 characters; letters, digits, '-', '_', '.'; no two
# special characters in a row; starts with a letter (not a digit or special character); and a
# PEP 508 name ends with a letter or digit (comfy-cli's normalize_project_name).
NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*")
# semver.org's own expression (MAJOR.MINOR.PATCH, optional -prerelease and +build)
SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?")
# A publisher id is "akin to a username, lowercase" (Registry API): lowercase letters, digits, '-'
PUBLISHER = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
# comfy-cli validate_version: each comma-separated part of requires-comfyui
COMFY_VERSION = re.compile(r"(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?")
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                "GPU :: Apple Metal"}


def _https_url(value) -> bool:
    u = urlparse(value) if isinstance(value, str) else None
    return bool(u and u.scheme == "https" and u.hostname and "." in u.hostname
                and u.path.strip("/") and not (u.username or u.password) and value == value.strip())


def registry_problems(data: dict) -> list[str]:
    """What the Registry would reject or comfy-cli would drop in a parsed pyproject.toml; [] if
    nothing. Reads tables and keys exactly where extract_node_configuration reads them."""
    bad = []
    project = data.get("project", {})
    if not isinstance(project, dict):
        return ["[project] must be a table"]
    name = project.get("name", "")
    if not (isinstance(name, str) and name and len(name) < 100 and NAME.fullmatch(name)):
        bad.append(f"[project] name {name!r}: letters, digits and single '-', '_' or '.' between "
                   "them, starting with a letter, under 100 characters")
    elif "comfy" in name.lower():
        bad.append(f"[project] name {name!r} must not contain 'ComfyUI' (Registry best practice; "
                   "comfy-cli strips comfy prefixes)")
    if "version" in project.get("dynamic", []):
        bad.append("[project] version must be static (dynamic needs [tool.comfy.version].path)")
    version = project.get("version", "")
    if not (isinstance(version, str) and SEMVER.fullmatch(version)):
        bad.append(f"[project] version {version!r} is not SemVer MAJOR.MINOR.PATCH")
    urls = project.get("urls", {})
    repo = urls.get("Repository", "") if isinstance(urls, dict) else ""
    if not _https_url(repo):
        bad.append(f"[project.urls] Repository {repo!r} is not an https URL of a repository")
    lic = project.get("license", None)
    if lic is not None and not (isinstance(lic, str) and lic.strip() or isinstance(lic, dict)
                                and ({"file", "text"} & set(lic))):
        bad.append(f"[project] license {lic!r}: a string, or a table with file or text")
    classifiers = project.get("classifiers", [])
    for c in classifiers:
        if c.startswith("Operating System :: ") and not c[20:].startswith(OS_PREFIXES):
            bad.append(f"classifier {c!r}: comfy-cli drops every OS classifier then")
        if c.startswith("Environment ::") and c[len("Environment :: "):] not in ACCELERATORS:
            bad.append(f"classifier {c!r}: comfy-cli drops every accelerator classifier then")
    tool = data.get("tool", {})
    comfy = tool.get("comfy", {}) if isinstance(tool, dict) else {}
    if not isinstance(comfy, dict) or not comfy:
        return bad + ["[tool.comfy] table is missing"]
    pid = comfy.get("PublisherId", "")
    if not (isinstance(pid, str) and PUBLISHER.fullmatch(pid)):
        bad.append(f"[tool.comfy] PublisherId {pid!r}: lowercase letters, digits and '-'")
    display = comfy.get("DisplayName", "")
    if not (isinstance(display, str) and display.strip() and display == display.strip()):
        bad.append(f"[tool.comfy] DisplayName {display!r} is empty")
    if "Icon" in comfy and comfy["Icon"] != "" and not _https_url(comfy["Icon"]):
        bad.append(f"[tool.comfy] Icon {comfy['Icon']!r} is not an https URL")
    req = comfy.get("requires-comfyui", "")
    if req and not all(COMFY_VERSION.fullmatch(p.strip()) for p in str(req).split(",")):
        bad.append(f"[tool.comfy] requires-comfyui {req!r}: [operator]X.Y.Z, comma-separated")
    return bad


def _pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_pyproject_has_the_registry_fields():
    data = _pyproject()
    assert registry_problems(data) == []
    from spare_core import __version__
    assert data["project"]["version"] == __version__, "pyproject and spare_core versions differ"


@pytest.mark.parametrize("edit,why", [
    (lambda d: d["project"].pop("name"), "name"),
    (lambda d: d["project"].update(name="ComfyUI-spare"), "ComfyUI"),
    (lambda d: d["project"].update(name="1-spare"), "starting with a letter"),
    (lambda d: d["project"].update(name="spare--unlearn"), "single"),
    (lambda d: d["project"].update(version="0.1"), "SemVer"),
    (lambda d: d["project"].update(version=1), "SemVer"),
    (lambda d: d["project"].pop("urls"), "Repository"),
    (lambda d: d["project"]["urls"].update(Repository="github.com/a/b"), "Repository"),
    (lambda d: d["project"]["urls"].update(Repository="https://user:pw@github.com/a/b"),
     "Repository"),
    (lambda d: d["tool"].pop("comfy"), r"\[tool.comfy\] table"),
    (lambda d: d["tool"]["comfy"].pop("PublisherId"), "PublisherId"),
    (lambda d: d["tool"]["comfy"].update(PublisherId="Spare Unlearn"), "PublisherId"),
    (lambda d: d["tool"]["comfy"].update(DisplayName=""), "DisplayName"),
    (lambda d: d["tool"]["comfy"].update(Icon="icon.png"), "Icon"),
    (lambda d: d["tool"]["comfy"].update(**{"requires-comfyui": ">=0.3"}), "requires-comfyui"),
])
def test_the_field_check_catches_each_missing_or_malformed_field(edit, why):
    data = _pyproject()
    edit(data)
    problems = registry_problems(data)
    assert len(problems) == 1 and re.search(why, problems[0]), problems


# ---------------------------------------------------------------- what the standards forbid

def _python_files(tops) -> list[str]:
    out = []
    for top in tops:
        path = os.path.join(REPO, top)
        if os.path.isfile(path):
            out += [path] if path.endswith(".py") else []
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                             and not d.endswith(".egg-info"))
            out += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    return out


def _repo_python_files() -> list[str]:
    """Every .py file of the repository that ruff (run by ``comfy node validate`` on ".") sees."""
    return _python_files(sorted(e for e in os.listdir(REPO) if not e.startswith(".")
                                and not e.endswith(".egg-info")))


FORBIDDEN_CALLS = {"eval", "exec"}  # builtins: ruff S307 / S102
INSTALL_MODULES = {"subprocess", "pip", "ensurepip", "pty"}
INSTALL_OS_CALLS = re.compile(r"system|popen|exec\w*|spawn\w*|posix_spawn\w*|fork\w*")


def forbidden_uses(source: str) -> list[str]:
    """eval/exec calls (also as builtins.eval) and statements joined by ';' (E702)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in FORBIDDEN_CALLS:
                found.append(f"line {node.lineno}: {f.id}()")
            elif (isinstance(f, ast.Attribute) and f.attr in FORBIDDEN_CALLS
                  and isinstance(f.value, ast.Name) and f.value.id in ("builtins", "__builtins__")):
                found.append(f"line {node.lineno}: builtins.{f.attr}()")
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.OP and tok.string == ";":
            found.append(f"line {tok.start[0]}: ';' joins statements (E702)")
    return found


def runtime_installs(source: str) -> list[str]:
    """Ways to run pip (or anything) from the pack at run time: importing subprocess/pip/
    ensurepip, or calling os.system/popen/exec*/spawn*."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in INSTALL_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in INSTALL_MODULES:
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "os" and INSTALL_OS_CALLS.fullmatch(node.attr)):
            found.append(f"line {node.lineno}: os.{node.attr}")
    return found


def test_no_eval_exec_or_joined_statements_anywhere():
    files = _repo_python_files()
    assert any(f.endswith(os.path.join("nodes", "file_nodes.py")) for f in files)
    bad = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            hits = forbidden_uses(f.read())
        if hits:
            bad[os.path.relpath(path, REPO)] = hits
    assert bad == {}, f"the Registry's standards forbid these (ruff S307/S102/E702): {bad}"


def test_the_pack_installs_nothing_at_run_time():
    files = _python_files(PACK_CODE)
    assert len(files) > 20
    bad = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            hits = runtime_installs(f.read())
        if hits:
            bad[os.path.relpath(path, REPO)] = hits
    assert bad == {}, ("the pack may not run pip or other programs at run time (dependencies go "
                       f"in requirements.txt / pyproject.toml): {bad}")


def test_the_scans_tell_legitimate_code_from_forbidden():
    ok = ("import torch\nmodel.eval()\nwith torch.no_grad():\n    y = m.exec_module(x)\n"
          "msg = 'run `pip install -r requirements.txt`'\nimport importlib\n")
    assert forbidden_uses(ok) == [] and runtime_installs(ok) == []
    assert len(forbidden_uses("eval('1')\nexec('x=1')\nbuiltins.eval('2')\na = 1; b = 2\n")) == 4
    assert len(runtime_installs("import subprocess\nfrom pip._internal import main\n"
                                "import os\nos.system('pip install x')\nos.execv('a', [])\n")) == 4
