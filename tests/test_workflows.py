"""The shipped workflows (SD1.5, SDXL, Flux; UI files and their API twins) agree with the node
definitions (ours from the pack's mappings, stock ones from comfy_double.STOCK_NODES, which
test_comfy_real checks against a real ComfyUI)."""
from __future__ import annotations

import copy
import json
import os

import pytest

from spare_core.concept_list import DEFAULT_FUSION
from spare_core.recipes import RECIPES
from comfy_double import (BYPASSED, MUTED, REPO, Host, load_pack, object_info, readme_bake_entry,
                          ui_to_api, validate_api_prompt, validate_ui_workflow)

WORKFLOWS = ("spare_erase_concept", "spare_erase_concept_sdxl", "spare_erase_concept_flux",
             "spare_erase_list")
SD1 = ("spare_erase_concept", "spare_erase_list")  # SD1.x graphs (512 px, the probe group)
LOADERS = {  # which stock nodes load the model, CLIP and VAE (node class, output slot)
    "spare_erase_concept": {"model": ("CheckpointLoaderSimple", 0),
                            "clip": ("CheckpointLoaderSimple", 1),
                            "vae": ("CheckpointLoaderSimple", 2)},
    "spare_erase_concept_flux": {"model": ("UNETLoader", 0), "clip": ("DualCLIPLoader", 0),
                                 "vae": ("VAELoader", 0)}}
LOADERS["spare_erase_concept_sdxl"] = LOADERS["spare_erase_list"] = LOADERS["spare_erase_concept"]


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    Host(str(tmp_path_factory.mktemp("comfy"))).install(mp)
    yield object_info(load_pack().NODE_CLASS_MAPPINGS)
    mp.undo()


@pytest.fixture(scope="module", params=WORKFLOWS)
def name(request):
    return request.param


@pytest.fixture(scope="module")
def ui(name):
    with open(os.path.join(REPO, "workflows", f"{name}.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def api(name):
    with open(os.path.join(REPO, "workflows", "api", f"{name}.api.json")) as f:
        return json.load(f)


def test_every_workflow_has_its_api_twin():
    top = sorted(f[:-5] for f in os.listdir(os.path.join(REPO, "workflows")) if f.endswith(".json"))
    assert top == sorted(WORKFLOWS)
    for w in WORKFLOWS:
        assert os.path.isfile(os.path.join(REPO, "workflows", "api", f"{w}.api.json")), w


def test_api_workflow_matches_the_node_definitions(api, info):
    assert validate_api_prompt(api, info) == []


def test_ui_workflow_matches_the_node_definitions(ui, info):
    assert validate_ui_workflow(ui, info) == []
    assert ui["last_node_id"] >= max(n["id"] for n in ui["nodes"])
    assert ui["last_link_id"] >= max(link[0] for link in ui["links"])


def test_ui_file_has_the_frontend_schema(ui):
    """The fields ComfyUI's frontend (1.27, zComfyWorkflow v0.4) requires to load a workflow."""
    assert isinstance(ui["version"], (int, float)) and isinstance(ui["last_link_id"], int)
    for n in ui["nodes"]:
        assert isinstance(n["id"], int) and isinstance(n["type"], str)
        assert all(len(n[k]) == 2 and all(isinstance(v, (int, float)) for v in n[k])
                   for k in ("pos", "size"))
        assert isinstance(n["flags"], dict) and isinstance(n["properties"], dict)
        assert isinstance(n["order"], int) and isinstance(n["mode"], int)
        assert all({"name", "type"} <= set(i) for i in n["inputs"] + n["outputs"])
    assert all(len(link) == 6 and isinstance(link[5], str) for link in ui["links"])
    for g in ui.get("groups", []):
        assert isinstance(g["title"], str) and len(g["bounding"]) == 4
    assert len({n["id"] for n in ui["nodes"]}) == len(ui["nodes"])
    assert len({link[0] for link in ui["links"]}) == len(ui["links"])


def test_every_ui_file_has_its_card_picture():
    from PIL import Image

    for w in WORKFLOWS:
        with Image.open(os.path.join(REPO, "workflows", f"{w}.jpg")) as im:
            assert im.format == "JPEG" and im.width == 768 and im.height > 256, w


def test_template_browser_gets_only_ui_files():
    """ComfyUI lists every ``workflows/*.json`` of a pack as a template, and its frontend loads
    them as UI graphs: an API-format file there would fail when picked."""
    top = [f for f in os.listdir(os.path.join(REPO, "workflows")) if f.endswith(".json")]
    assert top
    for name in top:
        with open(os.path.join(REPO, "workflows", name)) as f:
            data = json.load(f)
        assert isinstance(data.get("nodes"), list) and "links" in data, name


def test_ui_and_api_files_are_the_same_graph(ui, api, info):
    queued = ui_to_api(ui, info)
    assert queued == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


TITLE_H = 30   # LiteGraph draws a node's title bar above ``pos`` (NODE_TITLE_HEIGHT)
GROUP_H = 60   # a group's title plus the badges the frontend draws above each node title


def _box(node) -> tuple[float, float, float, float]:
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_H, x + w, y + h


def test_ui_layout_has_no_overlaps(ui):
    """Dropped on the canvas, no node hides another or a group's title, and each node sits in
    the group it belongs to (the layout was checked by eye in ComfyUI's frontend)."""
    boxes = {n["id"]: _box(n) for n in ui["nodes"]}
    ids = sorted(boxes)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, (a, b)
    groups = [g["bounding"] for g in ui["groups"]]
    for i, g in enumerate(groups):
        for h in groups[i + 1:]:
            assert g[0] + g[2] <= h[0] or h[0] + h[2] <= g[0] or g[1] + g[3] <= h[1] \
                or h[1] + h[3] <= g[1], (g, h)
    for nid, (x0, y0, x1, y1) in boxes.items():
        inside = [g for g in groups if g[0] <= x0 and x1 <= g[0] + g[2]
                  and g[1] + GROUP_H <= y0 and y1 <= g[1] + g[3]]
        assert len(inside) == 1, (nid, "not inside exactly one group, below its title")


def test_graph_shows_before_and_after_with_the_same_sampling(api, name):
    by_type: dict[str, list[str]] = {}
    for nid, node in api.items():
        by_type.setdefault(node["class_type"], []).append(nid)
    loader = LOADERS[name]["model"][0]
    for needed in (loader, "CLIPTextEncode", "SparseLoRAInit", "SelfDistillUnlearn",
                   "ApplyUnlearnAdapter", "SaveUnlearnAdapter", "VAEDecode"):
        assert needed in by_type, needed
    # the recipe's module selection needs no saliency map: no Compute Saliency is run for it
    init = api[by_type["SparseLoRAInit"][0]]["inputs"]
    assert init["module_selection"] == RECIPES["spare"].hparams["module_selection"]
    assert "ComputeSaliency" not in by_type and "saliency" not in init
    samplers = [api[n]["inputs"] for n in by_type["KSampler"]]
    assert len(samplers) == 2 and len(by_type["SaveImage"]) == 2
    before, after = sorted(samplers, key=lambda s: api[s["model"][0]]["class_type"] != loader)
    assert api[after["model"][0]]["class_type"] == "ApplyUnlearnAdapter"
    same = {k: v for k, v in before.items() if k != "model"}
    assert same == {k: v for k, v in after.items() if k != "model"}
    trained = api[by_type["SelfDistillUnlearn"][0]]["inputs"]
    assert api[trained["adapter"][0]]["class_type"] == "SparseLoRAInit"
    concept = trained["concept"].splitlines()[0]  # typed once, in Self-Distill Unlearn
    positive = api[before["positive"][0]]
    if positive["class_type"] == "FluxGuidance":  # Flux: the prompt's guidance value
        positive = api[positive["inputs"]["conditioning"][0]]
    prompt = positive["inputs"]["text"]
    assert concept and concept.lower() in prompt.lower()  # the images show the concept
    if name.endswith("flux"):  # Flux-dev: distilled guidance, so CFG 1 everywhere
        assert before["cfg"] == 1.0
    assert trained["cfg"] == -1.0  # the family's guidance (spare_core.recipes.pool_guidance)
    size = 512 if name in SD1 else 1024
    assert trained["width"] == trained["height"] == size
    # the training loss (Self-Distill Unlearn's second output) is previewed
    unl = by_type["SelfDistillUnlearn"][0]
    loss = [api[n] for n in by_type.get("PreviewImage", []) if api[n]["inputs"]["images"] == [unl, 1]]
    assert len(loss) == 1 and loss[0]["_meta"]["title"] == "Loss"


def test_the_list_workflow_trains_one_adapter_per_concept(api, name, info):
    """The list variant erases several concepts, each from the base model with its own adapter,
    fused into one file by the default fusion (per_concept); the single-concept graphs carry the
    same choice (no effect on one concept), so a list typed into them gets it too."""
    trained = next(v["inputs"] for v in api.values() if v["class_type"] == "SelfDistillUnlearn")
    concepts = [c for c in trained["concept"].splitlines() if c.strip()]
    inputs = info["SelfDistillUnlearn"]["input"]
    fusions = {**inputs["required"], **inputs.get("optional", {})}["per_concept"][0]
    if name == "spare_erase_list":
        assert len(concepts) >= 3 and trained["per_concept"] in fusions
        assert not set(concepts) & set(trained["preserve"].splitlines())
    else:
        assert len(concepts) == 1
    assert trained["per_concept"] == DEFAULT_FUSION


def test_node_defaults_are_valid(info):
    for name, defn in info.items():
        for section in ("required", "optional"):
            for inp, spec in defn["input"].get(section, {}).items():
                kind, opts = spec[0], spec[1] if len(spec) > 1 else {}
                if "default" in opts and isinstance(kind, list):
                    assert opts["default"] in kind, (name, inp)
                elif "default" in opts and kind in ("INT", "FLOAT"):
                    assert opts.get("min", -1e30) <= opts["default"] <= opts.get("max", 1e30), (name, inp)


@pytest.mark.parametrize("break_it, expected", [
    (lambda wf: wf["14"]["inputs"].pop("surrogate"), "missing required input 'surrogate'"),
    (lambda wf: wf["14"]["inputs"].update(stepz=3), "no such input"),
    (lambda wf: wf["15"]["inputs"].update(adapter=["1", 0]), "UNLEARN_ADAPTER input linked to a MODEL"),
    (lambda wf: wf["14"]["inputs"].update(objective="forget_everything"), "is not one of"),
    (lambda wf: wf["13"]["inputs"].update(mask_fraction=1.5), "> max"),
    (lambda wf: wf["19"].update(class_type="SaveUnlearnAdaptor"), "unknown node type"),
], ids=["missing input", "unknown input", "wrong link type", "bad combo", "out of range",
        "unknown node"])
def test_api_validation_catches_mistakes(api, info, break_it, expected):
    broken = copy.deepcopy(api)
    break_it(broken)
    assert any(expected in e for e in validate_api_prompt(broken, info))


def test_api_validation_reads_v3_combos():
    """A V3 node's combo (comfy_api io.Combo, as TorchCompileModel's backend) is described as
    ``["COMBO", {"options": [...]}]``: a literal from its options passes, others do not."""
    info = {"TorchCompileModel": {"input": {"required": {
        "model": ["MODEL", {}], "backend": ["COMBO", {"options": ["inductor", "cudagraphs"]}]}},
        "output": ["MODEL"]}, "Loader": {"input": {}, "output": ["MODEL"]}}

    def prompt(backend):
        return {"1": {"class_type": "Loader", "inputs": {}},
                "2": {"class_type": "TorchCompileModel",
                      "inputs": {"model": ["1", 0], "backend": backend}}}

    assert validate_api_prompt(prompt("inductor"), info) == []
    assert any("is not one of" in e for e in validate_api_prompt(prompt("tvm"), info))


def test_ui_validation_catches_mistakes(ui, info):
    broken = copy.deepcopy(ui)
    node = next(n for n in broken["nodes"] if n["type"] == "SelfDistillUnlearn")
    node["widgets_values"].pop()
    link = broken["links"][0]
    link[5] = "LATENT" if link[5] != "LATENT" else "IMAGE"
    errors = validate_ui_workflow(broken, info)
    assert any("widgets_values" in e for e in errors)
    assert any(f"link {link[0]}:" in e for e in errors)


BAKE = "Bake into a checkpoint"


def test_bake_group_holds_a_bypassed_checkpoint_save_of_the_patched_model(ui, name):
    """The optional group: the stock CheckpointSave fed by Apply's MODEL and the loader's CLIP and
    VAE, bypassed so that queueing the workflow writes no multi-GB file."""
    group = [g for g in ui["groups"] if g["title"].startswith(BAKE)]
    assert len(group) == 1 and "bypassed" in group[0]["title"]
    gx, gy, gw, gh = group[0]["bounding"]
    inside = [n for n in ui["nodes"] if gx <= n["pos"][0] and n["pos"][0] + n["size"][0] <= gx + gw
              and gy <= n["pos"][1] and n["pos"][1] + n["size"][1] <= gy + gh]
    assert [n["type"] for n in inside] == ["CheckpointSave"]
    save = inside[0]
    assert save["mode"] == BYPASSED
    assert save["widgets_values"][0].startswith("checkpoints/")
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    fed = {i["name"]: (nodes[links[i["link"]][1]]["type"], links[i["link"]][2]) for i in save["inputs"]}
    assert fed == {**LOADERS[name], "model": ("ApplyUnlearnAdapter", 0)}


def test_bake_node_enabled_queues_the_readme_api_entry(ui, api, info, name):
    """The API twin is what the frontend queues with the node bypassed; enabled, the frontend
    queues the twin plus exactly the entry workflows/README.md tells headless users to add
    (for the Flux file, with its CLIP and VAE loaders' ids in place of the checkpoint's)."""
    assert "CheckpointSave" not in {v["class_type"] for v in api.values()}
    enabled = copy.deepcopy(ui)
    for n in enabled["nodes"]:
        if n["type"] == "CheckpointSave":
            n["mode"] = 0
    twin = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    entry = copy.deepcopy(readme_bake_entry())
    (save,) = entry.values()
    ids = {cls: k for k, v in api.items() for cls in [v["class_type"]]}
    for inp in ("clip", "vae"):
        cls, slot = LOADERS[name][inp]
        save["inputs"][inp] = [ids[cls], slot]
    save["inputs"]["filename_prefix"] = next(
        n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "CheckpointSave")
    assert ui_to_api(enabled, info) == {**twin, **entry}
    assert validate_api_prompt({**api, **entry}, info) == []


def test_bypassed_and_muted_nodes_are_queued_as_the_frontend_does(ui, info):
    """A bypassed node passes its input of the same type through; a muted one feeds nothing."""
    apply_id = next(n["id"] for n in ui["nodes"] if n["type"] == "ApplyUnlearnAdapter")
    fed_by = {link[0]: link[1] for link in ui["links"]}
    after = next(n for n in ui["nodes"] if n["type"] == "KSampler"
                 and any(i["name"] == "model" and fed_by.get(i.get("link")) == apply_id
                         for i in n["inputs"]))
    loader = next(n["id"] for n in ui["nodes"]
                  if n["type"] in ("CheckpointLoaderSimple", "UNETLoader"))
    for mode, model in ((BYPASSED, [str(loader), 0]), (MUTED, None)):
        changed = copy.deepcopy(ui)
        next(n for n in changed["nodes"] if n["id"] == apply_id)["mode"] = mode
        queued = ui_to_api(changed, info)
        assert str(apply_id) not in queued
        assert queued[str(after["id"])]["inputs"].get("model") == model


PROBE = "Probe the erasure"
PROBE_NODES = ["ProbeErasure", "VAEDecode", "PreviewImage", "VAEDecode", "PreviewImage"]


def test_probe_group_holds_a_bypassed_probe_of_the_patched_model(ui, api, info, name):
    """SD1.x only (the prompt attack needs one CLIP): the optional group probes Apply's MODEL
    against the loader's, on the concept typed in Self-Distill Unlearn, and decodes both of its
    LATENTs for preview; bypassed, so the shipped run does not spend the attack's time. Enabled,
    the frontend queues the API twin plus these five nodes, which validate."""
    group = [g for g in ui["groups"] if g["title"].startswith(PROBE)]
    if name not in SD1:
        assert not group and "ProbeErasure" not in {n["type"] for n in ui["nodes"]}
        return
    assert len(group) == 1 and "bypassed" in group[0]["title"]
    gx, gy, gw, gh = group[0]["bounding"]
    inside = [n for n in ui["nodes"] if gx <= n["pos"][0] and n["pos"][0] + n["size"][0] <= gx + gw
              and gy <= n["pos"][1] and n["pos"][1] + n["size"][1] <= gy + gh]
    assert [n["type"] for n in inside] == PROBE_NODES
    assert all(n["mode"] == BYPASSED for n in inside)
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}

    def fed(node):
        return {i["name"]: (nodes[links[i["link"]][1]]["type"], links[i["link"]][2])
                for i in node["inputs"]}

    probe, decode_found, _, decode_plain, _ = inside
    loader = LOADERS[name]
    assert fed(probe) == {"original_model": loader["model"], "erased_model":
                          ("ApplyUnlearnAdapter", 0), "clip": loader["clip"]}
    assert fed(decode_found) == {"samples": ("ProbeErasure", 1), "vae": loader["vae"]}
    assert fed(decode_plain) == {"samples": ("ProbeErasure", 2), "vae": loader["vae"]}
    trained = next(n for n in ui["nodes"] if n["type"] == "SelfDistillUnlearn")
    # the same concept (a list's first)
    assert probe["widgets_values"][0] == trained["widgets_values"][0].splitlines()[0]

    enabled = copy.deepcopy(ui)
    for n in enabled["nodes"]:
        if n["id"] in {m["id"] for m in inside}:
            n["mode"] = 0
    queued = ui_to_api(enabled, info)
    twin = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    added = {k: v for k, v in queued.items() if k not in twin}
    assert {k: v for k, v in queued.items() if k in twin} == twin
    assert sorted(v["class_type"] for v in added.values()) == sorted(PROBE_NODES)
    assert validate_api_prompt(queued, info) == []
