"""Every node of the pack has its help page in ``web/docs/<NodeName>.md`` (the folder ComfyUI's
frontend reads for a custom node's docs, under the pack's WEB_DIRECTORY), and each page lists
every input of the node with the default the node has now, and every output."""
from __future__ import annotations

import os
import re

import pytest

from comfy_double import REPO, Host, load_pack


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    Host(str(tmp_path_factory.mktemp("comfy"))).install(mp)
    yield load_pack()
    mp.undo()


def _rows(page: str, heading: str) -> dict[str, list[str]]:
    """The ``| `name` | ... |`` rows of the table under ``## heading``: name -> other cells."""
    section = page.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([^`]+)` \|(.*)\|$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in re.split(r"(?<!\\)\|", m.group(2))]
    return rows


def _shown(default) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, str):
        return f"`{default}`".replace("\n", "\\n") if default else "(empty)"
    return f"`{default}`"


def test_web_directory_holds_one_page_per_node(pack):
    web = os.path.normpath(os.path.join(REPO, pack.WEB_DIRECTORY))
    pages = {f[:-3] for f in os.listdir(os.path.join(web, "docs")) if f.endswith(".md")}
    assert pages == set(pack.NODE_CLASS_MAPPINGS)


def test_each_page_lists_every_input_with_its_default_and_every_output(pack):
    web = os.path.join(REPO, pack.WEB_DIRECTORY, "docs")
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        with open(os.path.join(web, f"{name}.md")) as f:
            page = f.read()
        assert page.startswith(f"# {pack.NODE_DISPLAY_NAME_MAPPINGS[name]}\n"), name
        inputs = _rows(page, "Inputs")
        spec = {k: v for part in ("required", "optional")
                for k, v in cls.INPUT_TYPES().get(part, {}).items()}
        assert list(inputs) == list(spec), name  # every input, in the node's order
        for k, s in spec.items():
            opts = s[1] if len(s) > 1 else {}
            if "default" in opts:
                assert inputs[k][1] == _shown(opts["default"]), (name, k, inputs[k][1])
            tip = " ".join(opts.get("tooltip", "").split()).replace("|", "\\|")
            assert inputs[k][2] and inputs[k][2] == tip, (name, k)  # the node's own words
        outputs = _rows(page, "Outputs")
        names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
        assert list(outputs) == list(names), name
        assert [o[0] for o in outputs.values()] == list(cls.RETURN_TYPES), name
        assert "## What it feeds\n" in page, name
