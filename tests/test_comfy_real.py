"""The pack inside a real ComfyUI: skipped unless ``COMFYUI_ROOT`` points to a checkout.

Run it inside ComfyUI's own environment (it starts ``main.py --cpu`` with that interpreter), with
the pack's test extra installed there (``pip install -r requirements-test.txt``: pytest and
websocket-client) and the pack not pip-installed, as ComfyUI users have it::

    COMFYUI_ROOT=/work/comfy/ComfyUI /work/comfy/venv/bin/python -m pytest tests/test_comfy_real.py -s

What it does, all through ComfyUI's HTTP/websocket API as a headless client would:
1. builds the smallest SD1.5-shaped checkpoint ComfyUI's detection accepts (SD15 needs
   model_channels 320 and context_dim 768, read from the weights: one level with one ResBlock and
   the one transformer block that carries context_dim, output blocks without transformers, no
   middle block; a full-size random CLIP-L, since ComfyUI builds CLIP-L from a fixed config; a
   TAESD-keyed VAE), in a temporary base directory;
2. starts ComfyUI with this repository linked as ``custom_nodes/spare-unlearn`` (README's folder
   name; loaded as ComfyUI loads any pack), checks ``/object_info`` against the pack and the
   stock-node table of the unit tests;
3. validates and queues the shipped API workflow (sizes and steps made tiny: SparseLoRAInit's
   shipped selection (``all``, no saliency map), the concept typed once in SelfDistillUnlearn), follows
   progress on the websocket and checks ``/history``, the files written (the before / after
   images and the loss preview) and that the adapter sits on the modules the selection names;
4. checks that the saved LoRA in the stock LoraLoader samples the same latents as
   LoadUnlearnAdapter -> ApplyUnlearnAdapter, and differs from the original model; again with an
   element-masked adapter (ComputeSaliency with per-weight scores added to the graph,
   SparseLoRAInit on module_selection ``saliency`` at mask_fraction 0.5);
5. interrupts a long unlearning run: no adapter file appears and the original model still
   samples bit-identical latents;
6. runs DataUnlearn (SISS) on IMAGE batches made by the stock EmptyImage node (its loss image
   previewed), encoded by the
   checkpoint's VAE: the adapter saves, applies, and changes the samples of the original model;
7. bakes the patched MODEL (+ CLIP + VAE) with the stock CheckpointSave (the workflow's optional
   group, as workflows/README.md's API entry), reloads the file with CheckpointLoaderSimple: it
   samples bit-identical latents and images to the patched model, different ones from the original;
8. feeds SaveUnlearnAdapter a ``../`` prefix: ComfyUI's folder_paths refuses the same prefixes as
   the node, the user gets the node's error with the fix, and no file is written;
9. runs ComputeSaliency + SparseLoRAInit (module_selection ``saliency``) + SelfDistillUnlearn
   with the memory controls explicitly on and explicitly off: at a training batch of 1 their
   adapters change the concept's samples alike; at a batch of 2 (2 accumulated micro-batches vs
   one piece) both train and move the samples by a similar amount;
10. loads the UNet alone with the stock UNETLoader at weight_dtype fp8_e4m3fn: the shipped path
    (SparseLoRAInit's shipped selection on the fp8 UNet -> SelfDistillUnlearn) trains on it, and
    so do a LoRA placed by a saliency map of the normally loaded checkpoint and one placed by
    ComputeSaliency on the fp8 UNet itself;
11. enables the UI workflow's bypassed *Probe the erasure* group and queues what the frontend
    would: ProbeErasure attacks the patched model through ComfyUI's own CLIP-L (its token
    embedding hooked), reports the found prompt, and its two LATENTs decode to previews; again
    with SelfDistillUnlearn's adversarial switch on (the attack runs inside training too);
12. fetches every node's help page from the URL the frontend's node help asks for
    (``/extensions/spare-unlearn/docs/<NodeName>.md``), served from the pack's WEB_DIRECTORY;
13. runs the shipped list workflow (three concepts, per_concept least_squares, and sum) and reads
    its fused file;
14. loads one UNet file of fp8 values at weight_dtype default and fp8_e4m3fn, applies the same
    adapter to both (a weight patch on float32, a wrapper after the cast on fp8): bit-equal
    latents.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from spare_core.recipes import RECIPES
from comfy_double import (BYPASSED, FILE_LIST, REPO, STOCK_NODES, Host, load_pack, node_info,
                          readme_bake_entry, ui_to_api, validate_api_prompt,
                          validate_ui_workflow)

ROOT = os.environ.get("COMFYUI_ROOT")
pytestmark = pytest.mark.skipif(
    not ROOT, reason="COMFYUI_ROOT is not set: point it at a ComfyUI checkout and run this test "
                     "with that ComfyUI's Python (see the module docstring)")

CKPT = "tiny_sd15.safetensors"
OURS = ("ComputeSaliency", "SaliencyPreview", "SparseLoRAInit", "SelfDistillUnlearn",
        "DataUnlearn", "UCEErase", "ApplyUnlearnAdapter", "SaveUnlearnAdapter",
        "LoadUnlearnAdapter", "ProbeErasure")

RAND_INIT = r'''
g = torch.Generator().manual_seed(0)
def rand(key, shape):
    if key.endswith("bias") or key.endswith(".b"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return torch.randn(shape, generator=g) / fan_in ** 0.5
'''
"""Random weights for the build scripts (run in ComfyUI's Python): zero biases, unit scales,
fan-in-scaled normal matrices, seeded."""

BUILD = r'''
import sys, torch
from comfy.cli_args import args
args.cpu = True
import comfy.ops, comfy.taesd.taesd as taesd
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel
''' + RAND_INIT + r'''

unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                 num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                 transformer_depth_output=[0, 0], transformer_depth_middle=-2, context_dim=768,
                 num_heads=8, num_head_channels=-1, use_linear_in_transformer=False,
                 adm_in_channels=None, use_spatial_transformer=True, legacy=False,
                 use_temporal_resblock=False, use_temporal_attention=False,
                 dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
sd = {"model.diffusion_model." + k: rand(k, v.shape) for k, v in unet.state_dict().items()}
with torch.device("meta"):
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12,
                                      max_position_embeddings=77))
    vae = taesd.TAESD()
for k, v in te.state_dict().items():
    t = torch.randn(v.shape, generator=g) * 0.02 if "embedding" in k else rand(k, v.shape)
    sd["cond_stage_model.transformer." + k] = t.half()
for k, v in vae.state_dict().items():
    sd["first_stage_model." + k] = rand(k, v.shape) if v.dim() else torch.tensor(float(k == "vae_scale"))
save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[1])
'''


# ------------------------------------------------------------------ a headless client
class Comfy:
    """A started ComfyUI and the few API calls the tests make."""

    def __init__(self, url: str, base: str, log: str) -> None:
        self.url, self.base, self.log = url, base, log

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.load(r)

    def text(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return r.read().decode()

    def post(self, path: str, body: dict | None = None):
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                text = r.read().decode()
                return json.loads(text) if text else {}
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} -> {e.code}: {e.read().decode()[:3000]}") from e

    def run(self, prompt: dict, on_message=None, timeout: float = 900) -> tuple[dict, list]:
        """Queue ``prompt``, follow the websocket until it ends; (history entry, ws messages)."""
        import websocket

        client = str(uuid.uuid4())
        ws = websocket.create_connection(f"{self.url.replace('http', 'ws')}/ws?clientId={client}",
                                         timeout=timeout)
        try:
            pid = self.post("/prompt", {"prompt": prompt, "client_id": client})["prompt_id"]
            messages, end = [], time.time() + timeout
            while time.time() < end:
                raw = ws.recv()
                if not isinstance(raw, str):
                    continue  # binary preview frames
                msg = json.loads(raw)
                data = msg.get("data", {})
                if data.get("prompt_id") not in (None, pid):
                    continue
                messages.append(msg)
                if on_message is not None:
                    on_message(self, msg)
                if msg["type"] in ("execution_error", "execution_interrupted") or (
                        msg["type"] == "executing" and data.get("node") is None):
                    break
            history = self.get(f"/history/{pid}").get(pid, {})
        finally:
            ws.close()
        return history, messages

    def output_file(self, item: dict) -> str:
        folder = {"output": "output", "temp": "temp"}[item["type"]]
        return os.path.join(self.base, folder, item.get("subfolder", ""), item["filename"])

    def log_text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    pytest.importorskip("websocket", reason="needs websocket-client in ComfyUI's environment")
    base = str(tmp_path_factory.mktemp("comfy_base"))
    for sub in ("custom_nodes", "models/checkpoints", "models/loras"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    os.symlink(REPO, os.path.join(base, "custom_nodes", "spare-unlearn"))
    ckpt = os.path.join(base, "models", "checkpoints", CKPT)
    env = {**os.environ, "PYTHONPATH": ROOT}
    t = time.time()
    subprocess.run([sys.executable, "-c", BUILD, ckpt], cwd=ROOT, env=env, check=True,
                   timeout=600, capture_output=True)
    print(f"\nbuilt {CKPT}: {os.path.getsize(ckpt) / 2**20:.0f} MiB in {time.time() - t:.0f}s")
    with running_comfy(base) as server:
        yield server


def progress_by_node(messages: list, wf: dict) -> dict:
    """``{node id: [(value, max), ...]}`` of the websocket's progress messages; asserts that the
    training bar reached its end, and the saliency bar where the graph has ComputeSaliency (the
    shipped workflows do not: their selection needs no saliency map)."""
    progress: dict = {}
    for m in messages:
        if m["type"] == "progress":
            progress.setdefault(m["data"]["node"], []).append((m["data"]["value"], m["data"]["max"]))
    kinds = {v["class_type"] for v in wf.values()}
    for kind in ("ComputeSaliency", "SelfDistillUnlearn"):
        if kind == "ComputeSaliency" and kind not in kinds:
            continue
        updates = progress.get(node_of(wf, kind))
        assert updates and updates[-1][0] == updates[-1][1], (kind, updates)
    return progress


@contextlib.contextmanager
def running_comfy(base: str):
    """A ComfyUI server (this checkout's ``main.py``, CPU) on a free port over ``base`` (its
    models, custom_nodes, output); yields a :class:`Comfy` once ``/object_info`` answers, and
    stops the server after."""
    port, log = _free_port(), os.path.join(base, "comfyui.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--base-directory", base, "--database-url", "sqlite:///:memory:",
             "--disable-auto-launch"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    server = Comfy(f"http://127.0.0.1:{port}", base, log)
    try:
        t, deadline = time.time(), time.time() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail("ComfyUI exited while starting:\n" + server.log_text()[-4000:])
            try:
                server.info = server.get("/object_info")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > deadline:
                    pytest.fail("ComfyUI did not start in 300s:\n" + server.log_text()[-4000:])
                time.sleep(2)
        print(f"ComfyUI up in {time.time() - t:.0f}s with {len(server.info)} node types")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------------ the workflows, made tiny
def tiny_workflow(wf: dict | None = None) -> dict:
    """The shipped API workflow (or ``wf``, a prompt of its nodes) with tiny sizes and steps."""
    if wf is None:
        with open(os.path.join(REPO, "workflows", "api", "spare_erase_concept.api.json")) as f:
            wf = json.load(f)
    for node in wf.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CKPT
        if "width" in inputs:
            inputs.update(width=64, height=64)
        if kind == "KSampler":
            inputs["steps"] = 4
        if kind == "ComputeSaliency":
            inputs.update(samples=2, sample_steps=3)
        if kind == "SelfDistillUnlearn":
            inputs.update(steps=6, lr=1e-2, batch_size=1, pool_size=2, pool_steps=3)
        if kind == "SaveUnlearnAdapter":
            inputs["filename_prefix"] = "spare/test_erased"
        if kind == "ProbeErasure":
            inputs.update(attack_steps=3, num_images=1, sample_steps=2, attack_batch=2)
    return wf


def node_of(wf: dict, kind: str) -> str:
    return next(k for k, v in wf.items() if v["class_type"] == kind)


def sample_branch(wf: dict, nid: str, model: list, prefix: str) -> None:
    """KSampler (settings of the workflow's 'before' sampler) -> SaveLatent, on ``model``."""
    src = tiny_workflow()
    before = next(v for v in src.values() if v["class_type"] == "KSampler"
                  and src[v["inputs"]["model"][0]]["class_type"] == "CheckpointLoaderSimple")
    wf[nid] = {"class_type": "KSampler", "inputs": {**before["inputs"], "model": model}}
    wf[nid + "0"] = {"class_type": "SaveLatent",
                     "inputs": {"samples": [nid, 0], "filename_prefix": f"cmp/{prefix}"}}


def keep(wf: dict, ids: list[str]) -> dict:
    return {k: wf[k] for k in ids}


def saliency_node(wf: dict, model: list | None = None, **inputs) -> dict:
    """A ComputeSaliency node (ranking ``saliency``, tiny sizes) for the concept the workflow's
    SelfDistillUnlearn erases, on the workflow's checkpoint (or ``model``): the shipped workflows
    adapt the recipe's selection, which needs no saliency map, so the tests that need one add it."""
    ck = node_of(wf, "CheckpointLoaderSimple")
    return {"class_type": "ComputeSaliency", "inputs": {
        "model": model or [ck, 0], "clip": [ck, 1],
        "concept": wf[node_of(wf, "SelfDistillUnlearn")]["inputs"]["concept"], "samples": 2,
        "ranking": "saliency", "seed": 0, "width": 64, "height": 64, "sample_steps": 3,
        "cfg": -1.0, "micro_batch": 1, "gradient_checkpointing": True, "element_scores": False,
        **inputs}}


def saliency_init(wf: dict, saliency: str, **inputs) -> dict:
    """The workflow's SparseLoRAInit switched to module_selection ``saliency``, fed by the
    ComputeSaliency node ``saliency``."""
    init = wf[node_of(wf, "SparseLoRAInit")]
    return {"class_type": "SparseLoRAInit", "inputs": {
        **init["inputs"], "module_selection": "saliency", "saliency": [saliency, 0], **inputs}}


SHIPPED = RECIPES["spare"].hparams["module_selection"]


def is_text_kv(module: str) -> bool:
    """A cross-attention key/value projection of the SD UNet (what text_kv adapts)."""
    return module.endswith((".attn2.to_k", ".attn2.to_v"))


def is_shipped_selection(mods: list[str]) -> bool:
    """The adapter's modules (ComfyUI names) are what the recipe's selection picks: text_kv
    every cross-attention to_k / to_v and nothing else; all every module but the UNet's input
    and output convolutions, attention and ResNet layers alike."""
    if not mods:
        return False
    if SHIPPED == "text_kv":
        return all(is_text_kv(m) for m in mods) and {m.rsplit(".", 1)[1] for m in mods} == {
            "to_k", "to_v"}
    if SHIPPED == "all":
        return (not {"input_blocks.0.0", "out.2"} & set(mods)
                and any(".attn2.to_k" in m for m in mods) and any(".in_layers." in m for m in mods))
    raise AssertionError(f"no check for the shipped selection {SHIPPED!r}")


# ------------------------------------------------------------------ tests
def test_pack_loads_like_any_custom_node(comfy, monkeypatch, tmp_path):
    lines = [line for line in comfy.log_text().splitlines()
             if line.rstrip().endswith("custom_nodes/spare-unlearn")]
    assert lines and not any("IMPORT FAILED" in line for line in lines), lines
    Host(str(tmp_path)).install(monkeypatch)  # folder_paths for INPUT_TYPES in this process
    mappings = load_pack().NODE_CLASS_MAPPINGS
    for name in OURS:
        assert name in comfy.info, name
        ours, real = node_info(mappings[name]), comfy.info[name]
        assert real["output"] == ours["output"] and real["output_name"] == ours["output_name"]
        for section in ("required", "optional"):
            want = {k: v[0] for k, v in ours["input"].get(section, {}).items()}
            got = {k: v[0] for k, v in real["input"].get(section, {}).items()}
            if section == "required" and name == "LoadUnlearnAdapter":
                want, got = want.keys(), got.keys()  # a file list: contents differ by folder
            assert got == want, (name, section)
    print(f"pack: {len(OURS)} node types served by /object_info; objectives "
          f"{comfy.info['SelfDistillUnlearn']['input']['required']['objective'][0]}")


def test_stock_node_table_matches_this_comfyui(comfy):
    for name, doc in STOCK_NODES.items():
        real = comfy.info[name]
        assert real["output"] == doc["output"], name
        assert bool(real.get("output_node")) == bool(doc.get("output_node")), name
        for section in ("required", "optional"):
            want, got = doc["input"].get(section, {}), real["input"].get(section, {})
            assert list(got) == list(want), (name, section)
            for inp, (kind, opts) in want.items():
                rkind, ropts = got[inp][0], got[inp][1] if len(got[inp]) > 1 else {}
                if kind is FILE_LIST or isinstance(kind, list):
                    assert isinstance(rkind, list), (name, inp)
                    if isinstance(kind, list):
                        assert set(kind) <= set(rkind), (name, inp, set(kind) - set(rkind))
                else:
                    assert rkind == kind, (name, inp)
                for key in ("min", "max", "default", "control_after_generate"):
                    if key in opts:
                        assert ropts.get(key) == opts[key], (name, inp, key)


def test_the_server_serves_each_help_page_where_the_frontend_asks(comfy):
    """The frontend's node help (ComfyUI frontend 1.27, NodeHelpService) fetches
    ``/extensions/<custom_nodes folder>/docs/<NodeName>.md``, the folder taken from the node's
    ``python_module``; the pack's WEB_DIRECTORY puts ``web/docs`` there for every node."""
    ours = {k: v for k, v in comfy.info.items()
            if v.get("python_module", "").startswith("custom_nodes.spare-unlearn")}
    pages = {f[:-3] for f in os.listdir(os.path.join(REPO, "web", "docs")) if f.endswith(".md")}
    assert len(ours) == 10 and set(ours) == pages
    for name, node in ours.items():
        module = node["python_module"].split(".")
        assert module[0] == "custom_nodes", node["python_module"]
        folder = module[1].split("@")[0]  # the frontend's extractCustomNodeName
        page = comfy.text(f"/extensions/{folder}/docs/{name}.md")
        with open(os.path.join(REPO, "web", "docs", f"{name}.md")) as f:
            assert page == f.read(), name


def test_shipped_workflows_validate_against_object_info(comfy):
    assert validate_api_prompt(tiny_workflow(), comfy.info) == []
    with open(os.path.join(REPO, "workflows", "spare_erase_concept.json")) as f:
        ui = json.load(f)
    for n in ui["nodes"]:
        if n["type"] == "CheckpointLoaderSimple":
            n["widgets_values"][0] = CKPT
    assert validate_ui_workflow(ui, comfy.info) == []


@pytest.fixture(scope="module")
def erased(comfy):
    """The shipped workflow, executed once."""
    wf = tiny_workflow()
    t = time.time()
    history, messages = comfy.run(wf)
    print(f"workflow executed in {time.time() - t:.0f}s: {history.get('status', {}).get('status_str')}")
    return wf, history, messages


def test_workflow_runs_and_writes_its_outputs(comfy, erased):
    from PIL import Image

    wf, history, messages = erased
    errors = [m["data"] for m in messages if m["type"] == "execution_error"]
    assert not errors, json.dumps(errors, indent=1)[:4000]
    assert history["status"]["status_str"] == "success"
    outputs = history["outputs"]
    images = {}
    for nid, out in outputs.items():
        for item in out.get("images", []):
            path = comfy.output_file(item)
            assert os.path.isfile(path), path
            images[wf[nid]["_meta"]["title"]] = Image.open(path)
    assert set(images) == {"Before", "After", "Loss"}, sorted(images)  # no saliency chart
    assert images["Before"].size == images["After"].size == (64, 64)
    assert images["Loss"].size == (768, 384)  # Self-Distill Unlearn's loss, previewed
    lora = outputs[node_of(wf, "SaveUnlearnAdapter")]["text"][0]
    assert lora == "spare/test_erased_00001_.safetensors"
    loras = os.path.join(comfy.base, "models", "loras")
    assert os.path.isfile(os.path.join(loras, lora))
    native = os.path.join(loras, lora.replace(".safetensors", ".spare.safetensors"))
    from safetensors import safe_open
    with safe_open(native, "pt") as f:  # concept typed once, in SelfDistillUnlearn
        assert f.metadata()["concept"] == wf[node_of(wf, "SelfDistillUnlearn")]["inputs"]["concept"]
    # the shipped selection (the recipe's), on the modules it names
    assert wf[node_of(wf, "SparseLoRAInit")]["inputs"]["module_selection"] == SHIPPED
    mods = _adapter_modules(comfy, lora)
    assert is_shipped_selection(mods), sorted(mods)
    progress = progress_by_node(messages, wf)
    print(f"outputs: {sorted(images)}, {lora}; progress updates: "
          f"{ {wf[k]['class_type']: len(v) for k, v in progress.items()} }")


@pytest.mark.parametrize("fusion", ["shipped", "sum"])
def test_list_workflow_saves_one_fused_adapter_for_its_concepts(comfy, fusion):
    """The shipped list workflow (tiny): one adapter per concept line, fused by its per_concept
    choice (as shipped: least squares, which reads each layer's inputs through ComfyUI's model;
    and sum) into one saved file that names every concept and the fusion."""
    with open(os.path.join(REPO, "workflows", "api", "spare_erase_list.api.json")) as f:
        wf = tiny_workflow(json.load(f))
    if fusion != "shipped":
        wf[node_of(wf, "SelfDistillUnlearn")]["inputs"]["per_concept"] = fusion
    ck, init, unl, save = (node_of(wf, k) for k in ("CheckpointLoaderSimple", "SparseLoRAInit",
                                                     "SelfDistillUnlearn", "SaveUnlearnAdapter"))
    run = keep(wf, [ck, init, unl, save])
    run[unl]["inputs"]["steps"] = 3
    run[save]["inputs"]["filename_prefix"] = f"spare/test_list_{fusion}"
    assert validate_api_prompt(run, comfy.info) == []
    history, messages = comfy.run(run)
    assert history["status"]["status_str"] == "success", json.dumps(messages)[-3000:]
    lora = history["outputs"][save]["text"][0]
    native = os.path.join(comfy.base, "models", "loras",
                          lora.replace(".safetensors", ".spare.safetensors"))
    from safetensors import safe_open
    with safe_open(native, "pt") as f:
        meta = f.metadata()
    inputs = run[unl]["inputs"]
    assert meta["concept"] == inputs["concept"] and len(meta["concept"].splitlines()) == 3
    assert meta["per_concept"] == inputs["per_concept"] != "shared"
    assert is_shipped_selection(_adapter_modules(comfy, lora))


def _latent(comfy, history: dict, nid: str):
    from safetensors.torch import load_file

    item = history["outputs"][nid]["latents"][0]
    return load_file(comfy.output_file(item))["latent_tensor"]


def masked_adapter(comfy) -> str:
    """Train and save an element-masked adapter (saved with full-difference keys); its LoRA name."""
    wf = tiny_workflow()
    ck, init, unl, save = (node_of(wf, k) for k in ("CheckpointLoaderSimple", "SparseLoRAInit",
                                                     "SelfDistillUnlearn", "SaveUnlearnAdapter"))
    run = keep(wf, [ck, unl, save])
    run["10"] = saliency_node(wf, element_scores=True)  # per-weight scores, needed for masks
    # the saliency's top modules, each update kept to half of its weight's elements
    run[init] = saliency_init(wf, "10", mask_fraction=0.5)
    run[unl]["inputs"]["steps"] = 3
    run[save]["inputs"]["filename_prefix"] = "spare/test_masked"
    assert validate_api_prompt(run, comfy.info) == []
    history, messages = comfy.run(run)
    assert history["status"]["status_str"] == "success", json.dumps(messages)[-3000:]
    return history["outputs"][save]["text"][0]


@pytest.mark.parametrize("kind", ["low-rank", "element-masked"])
def test_saved_lora_in_stock_loraloader_matches_apply(comfy, erased, kind):
    from safetensors.torch import load_file

    wf, history, _ = erased
    if kind == "low-rank":
        lora = history["outputs"][node_of(wf, "SaveUnlearnAdapter")]["text"][0]
    else:
        lora = masked_adapter(comfy)
    keys = load_file(os.path.join(comfy.base, "models", "loras", lora)).keys()
    assert all(k.endswith(".diff") for k in keys) == (kind == "element-masked")
    diff, effect, scale, base = lora_vs_apply(comfy, wf, lora, 0.8, kind)
    print(f"{kind} LoRA ({len(keys)} keys): LoraLoader vs ApplyUnlearnAdapter max |diff| "
          f"{diff:.2e}; adapter effect {effect:.2e} (latent scale {scale:.2f})")
    comfy.base_latent = base


def lora_vs_apply(comfy, wf: dict, lora: str, strength: float, tag: str):
    """Sample the workflow's prompt on the stock LoraLoader with ``lora``, on
    ApplyUnlearnAdapter with its native twin, and on the base model (same seed); assert the two
    patched runs agree, differ from the base and leave no unloaded LoRA key. Returns
    ``(max |lora - apply|, max |apply - base|, latent scale, base latent)``."""
    ck, empty = node_of(wf, "CheckpointLoaderSimple"), node_of(wf, "EmptyLatentImage")
    cmp = keep(wf, [ck, "2", "3", empty])
    cmp["30"] = {"class_type": "LoraLoader", "inputs": {
        "model": [ck, 0], "clip": [ck, 1], "lora_name": lora, "strength_model": strength,
        "strength_clip": 1.0}}
    cmp["31"] = {"class_type": "LoadUnlearnAdapter",
                 "inputs": {"adapter_name": lora.replace(".safetensors", ".spare.safetensors")}}
    cmp["32"] = {"class_type": "ApplyUnlearnAdapter",
                 "inputs": {"model": [ck, 0], "adapter": ["31", 0], "strength": strength}}
    sample_branch(cmp, "40", ["30", 0], f"{tag}_lora")
    sample_branch(cmp, "41", ["32", 0], f"{tag}_apply")
    sample_branch(cmp, "42", [ck, 0], f"{tag}_base")
    assert validate_api_prompt(cmp, comfy.get("/object_info")) == []  # lists the new LoRA
    h, messages = comfy.run(cmp)
    assert h["status"]["status_str"] == "success", json.dumps(messages)[-3000:]
    via_lora, via_apply, base = (_latent(comfy, h, n) for n in ("400", "410", "420"))
    scale = float(base.abs().max())
    diff = float((via_lora - via_apply).abs().max())
    effect = float((via_apply - base).abs().max())
    assert diff <= 1e-4 * max(scale, 1.0)
    assert effect > 100 * max(diff, 1e-6)
    log = comfy.log_text()
    assert "lora key not loaded" not in log and "NOT LOADED" not in log
    return diff, effect, scale, base


def test_uce_erase_saves_a_lora_the_stock_loader_applies_as_apply_does(comfy, erased):
    """UCEErase (closed form) -> SaveUnlearnAdapter; the saved LoRA in the stock LoraLoader
    samples what ApplyUnlearnAdapter does, with no unloaded keys, and differs from the base."""
    from safetensors.torch import load_file

    wf, _, _ = erased
    ck, empty = node_of(wf, "CheckpointLoaderSimple"), node_of(wf, "EmptyLatentImage")
    run = keep(wf, [ck, "2", "3", empty])
    run["50"] = {"class_type": "UCEErase", "inputs": {
        "model": [ck, 0], "clip": [ck, 1], "concepts": "Van Gogh style\nClaude Monet style",
        "guides": "a painting", "preserve": "a photo of a cat", "preserve_scale": 1.0,
        "lamb": 0.5}}
    run["51"] = {"class_type": "SaveUnlearnAdapter", "inputs": {
        "adapter": ["50", 0], "filename_prefix": "spare/test_uce", "keep_native": True}}
    h, messages = comfy.run(run)
    assert h["status"]["status_str"] == "success", json.dumps(messages)[-3000:]
    lora = h["outputs"]["51"]["text"][0]
    keys = load_file(os.path.join(comfy.base, "models", "loras", lora)).keys()
    assert keys and all(k.endswith(".diff") and "attn2_to_" in k for k in keys)
    diff, effect, scale, _ = lora_vs_apply(comfy, wf, lora, 1.0, "uce")
    print(f"UCE LoRA ({len(keys)} keys): LoraLoader vs Apply max |diff| {diff:.2e}; effect "
          f"{effect:.2e} (latent scale {scale:.2f})")


def test_interrupt_leaves_no_file_and_the_model_unchanged(comfy, erased):
    wf = tiny_workflow()
    ck, unl, save = (node_of(wf, k) for k in ("CheckpointLoaderSimple", "SelfDistillUnlearn",
                                               "SaveUnlearnAdapter"))
    run = keep(wf, [ck, node_of(wf, "SparseLoRAInit"), unl, save])
    run[unl]["inputs"].update(steps=5000, seed=7)
    run[save]["inputs"]["filename_prefix"] = "spare/interrupted"
    pressed = []

    def press_cancel(server: Comfy, msg: dict) -> None:
        data = msg.get("data", {})
        if (not pressed and msg["type"] == "progress" and data.get("node") == unl
                and data["value"] > 20):  # inside the training steps
            server.post("/interrupt")
            pressed.append(data["value"])

    history, messages = comfy.run(run, on_message=press_cancel)
    assert pressed and any(m["type"] == "execution_interrupted" for m in messages)
    assert not any(f.startswith("interrupted") for _, _, fs in os.walk(
        os.path.join(comfy.base, "models", "loras")) for f in fs)
    check = keep(wf, [ck, "2", "3", node_of(wf, "EmptyLatentImage")])
    sample_branch(check, "50", [ck, 0], "base_after_interrupt")
    h, _ = comfy.run(check)
    assert h["status"]["status_str"] == "success"
    after = _latent(comfy, h, "500")
    import torch
    if hasattr(comfy, "base_latent"):
        assert torch.equal(after, comfy.base_latent)
    print(f"interrupted at progress {pressed[0]}; no adapter file; original model unchanged")


def test_a_compiled_model_trains_and_samples_what_the_eager_one_does(comfy, erased):
    """TorchCompileModel (inductor) in front of the shipped workflow: the erasure trains on the
    compiled MODEL, and its 'before' and 'after' samples equal the eager model's (the same
    adapter applied to the plain checkpoint). End to end only: torch.compile reads a module's
    parameters at each call, so this holds with or without the bridge's restore; that the nodes
    give back the very Parameter objects is tests/test_nodes.py's
    test_nodes_give_the_model_back_its_own_weight_objects."""
    import shutil

    import torch

    if not shutil.which(os.environ.get("CXX", "g++")):
        pytest.skip("inductor needs a C++ compiler on the CPU")
    wf = tiny_workflow()
    ck, empty, init, unl, apply_ = (node_of(wf, k) for k in (
        "CheckpointLoaderSimple", "EmptyLatentImage", "SparseLoRAInit", "SelfDistillUnlearn",
        "ApplyUnlearnAdapter"))
    run = keep(wf, [ck, "2", "3", empty, init, unl, apply_])
    run["50"] = {"class_type": "TorchCompileModel",
                 "inputs": {"model": [ck, 0], "backend": "inductor"}}
    for nid in (init, unl, apply_):
        run[nid]["inputs"]["model"] = ["50", 0]
    run["60"] = {"class_type": "ApplyUnlearnAdapter",
                 "inputs": {"model": [ck, 0], "adapter": [unl, 0], "strength": 1.0}}
    sample_branch(run, "70", ["50", 0], "compiled_before")
    sample_branch(run, "71", [apply_, 0], "compiled_after")
    sample_branch(run, "72", [ck, 0], "eager_before")
    sample_branch(run, "73", ["60", 0], "eager_after")
    assert validate_api_prompt(run, comfy.info) == []
    t = time.time()
    history, messages = comfy.run(run, timeout=1500)
    assert history["status"]["status_str"] == "success", json.dumps(messages)[-3000:]
    before, after, eager_before, eager_after = (
        _latent(comfy, history, n) for n in ("700", "710", "720", "730"))
    scale = float(eager_before.abs().max())
    tol = 1e-3 * max(scale, 1.0)  # inductor's fused kernels round differently from eager
    torch.testing.assert_close(before, eager_before, rtol=0, atol=tol)
    torch.testing.assert_close(after, eager_after, rtol=0, atol=tol)
    effect = float((eager_after - eager_before).abs().max())
    assert effect > 10 * tol
    print(f"compiled MODEL: trained and sampled in {time.time() - t:.0f}s; compiled vs eager max "
          f"|diff| {float((before - eager_before).abs().max()):.1e} (before), "
          f"{float((after - eager_after).abs().max()):.1e} (after); effect {effect:.2e}")


def test_readme_client_runs_the_api_workflow(comfy, tmp_path):
    """The ~20-line client in workflows/README.md, as a studio would run it."""
    with open(os.path.join(REPO, "workflows", "README.md")) as f:
        text = f.read()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    wf = tiny_workflow()
    wf[node_of(wf, "SelfDistillUnlearn")]["inputs"]["seed"] = 11  # not cached: runs again
    wf[node_of(wf, "SaveUnlearnAdapter")]["inputs"]["filename_prefix"] = "spare/headless"
    path = tmp_path / "workflow.api.json"
    path.write_text(json.dumps(wf))
    out = subprocess.run([sys.executable, "-c", code, str(path), comfy.url.split("//")[1]],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    unl = node_of(wf, "SelfDistillUnlearn")
    assert f"node {unl}: " in out.stdout and "spare/headless_00001_.safetensors" in out.stdout
    print(f"README client: {len(out.stdout.splitlines())} lines, e.g. "
          f"{[line for line in out.stdout.splitlines() if line.startswith(f'node {unl}:')][-1]}")


def test_data_unlearn_on_stock_image_batches(comfy, erased):
    """DataUnlearn on IMAGE batches from the stock EmptyImage node (red forget set, blue keep
    set), through the checkpoint's VAE; saved, applied, sampled."""
    wf = tiny_workflow()
    ck = node_of(wf, "CheckpointLoaderSimple")
    run = keep(wf, [ck, "2", "3", node_of(wf, "EmptyLatentImage")])
    for nid, color in (("60", 0xFF0000), ("61", 0x0000FF)):
        run[nid] = {"class_type": "EmptyImage",
                    "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": color}}
    run["62"] = {"class_type": "DataUnlearn", "inputs": {
        "model": [ck, 0], "clip": [ck, 1], "vae": [ck, 2], "forget_images": ["60", 0],
        "keep_images": ["61", 0], "method": "siss", "steps": 4, "lr": 1e-3,
        "parameterization": "lora", "seed": 3, "rank": 2, "batch_size": 1,
        "early_stop_every": 0}}  # flat colours are not memorised: the stop would end it at once
    run["63"] = {"class_type": "SaveUnlearnAdapter", "inputs": {
        "adapter": ["62", 0], "filename_prefix": "spare/test_data", "keep_native": True}}
    run["64"] = {"class_type": "ApplyUnlearnAdapter",
                 "inputs": {"model": [ck, 0], "adapter": ["62", 0], "strength": 1.0}}
    run["67"] = {"class_type": "PreviewImage", "inputs": {"images": ["62", 1]}}  # its loss
    sample_branch(run, "65", ["64", 0], "data_after")
    sample_branch(run, "66", [ck, 0], "data_base")
    assert validate_api_prompt(run, comfy.info) == []
    t = time.time()
    history, messages = comfy.run(run)
    assert history["status"]["status_str"] == "success", json.dumps(messages)[-3000:]
    lora = history["outputs"]["63"]["text"][0]
    assert lora == "spare/test_data_00001_.safetensors"
    assert os.path.isfile(os.path.join(comfy.base, "models", "loras", lora))
    progress = [m["data"]["value"] for m in messages
                if m["type"] == "progress" and m["data"]["node"] == "62"]
    assert progress and progress[-1] == 4, progress
    from PIL import Image
    (loss,) = history["outputs"]["67"]["images"]
    assert Image.open(comfy.output_file(loss)).size == (768, 384)
    after, base = _latent(comfy, history, "650"), _latent(comfy, history, "660")
    effect = float((after - base).abs().max())
    assert effect > 0
    print(f"DataUnlearn (siss, 4 steps) ran in {time.time() - t:.0f}s, saved {lora}; "
          f"adapter effect on latents {effect:.2e}")


def test_checkpoint_save_bakes_the_patched_model(comfy, erased):
    """The stock CheckpointSave after ApplyUnlearnAdapter (the workflow's optional group, as the
    README's API entry): the saved checkpoint, reloaded by CheckpointLoaderSimple, samples what
    the patched MODEL samples, and not what the original does."""
    import shutil

    import numpy as np
    import torch
    from PIL import Image

    wf, history, _ = erased
    native = history["outputs"][node_of(wf, "SaveUnlearnAdapter")]["text"][0].replace(
        ".safetensors", ".spare.safetensors")
    ck, apply_id = node_of(wf, "CheckpointLoaderSimple"), node_of(wf, "ApplyUnlearnAdapter")
    empty = node_of(wf, "EmptyLatentImage")
    bake = readme_bake_entry()
    (save_id, save), = bake.items()
    assert save["inputs"]["model"] == [apply_id, 0] and save["inputs"]["vae"] == [ck, 2]
    save["inputs"]["filename_prefix"] = "checkpoints/test_baked"
    run = keep(wf, [ck, "2", "3", empty])
    run["31"] = {"class_type": "LoadUnlearnAdapter", "inputs": {"adapter_name": native}}
    run[apply_id] = {"class_type": "ApplyUnlearnAdapter",
                     "inputs": {"model": [ck, 0], "adapter": ["31", 0], "strength": 1.0}}
    run[save_id] = save
    sample_branch(run, "41", [apply_id, 0], "bake_patched")
    sample_branch(run, "42", [ck, 0], "bake_original")
    run["43"] = {"class_type": "VAEDecode", "inputs": {"samples": ["41", 0], "vae": [ck, 2]}}
    run["44"] = {"class_type": "SaveImage", "inputs": {"images": ["43", 0],
                                                       "filename_prefix": "cmp/bake_patched"}}
    assert validate_api_prompt(run, comfy.get("/object_info")) == []  # lists the saved adapter
    t = time.time()
    h, messages = comfy.run(run)
    assert h["status"]["status_str"] == "success", json.dumps(messages)[-3000:]
    saved = os.path.join(comfy.base, "output", "checkpoints", "test_baked_00001_.safetensors")
    assert os.path.isfile(saved), os.listdir(os.path.join(comfy.base, "output"))
    print(f"\nCheckpointSave wrote {os.path.getsize(saved) / 2**20:.0f} MiB in {time.time() - t:.0f}s")

    # as a user would: move it into models/checkpoints and load it like any checkpoint
    shutil.copyfile(saved, os.path.join(comfy.base, "models", "checkpoints", "test_baked.safetensors"))
    again = keep(wf, [empty])
    again["50"] = {"class_type": "CheckpointLoaderSimple",
                   "inputs": {"ckpt_name": "test_baked.safetensors"}}
    for nid in ("2", "3"):  # the prompts, encoded by the baked checkpoint's own CLIP
        again["5" + nid] = {"class_type": "CLIPTextEncode",
                            "inputs": {**wf[nid]["inputs"], "clip": ["50", 1]}}
    sample_branch(again, "55", ["50", 0], "bake_reloaded")
    again["55"]["inputs"].update(positive=["52", 0], negative=["53", 0])
    again["56"] = {"class_type": "VAEDecode", "inputs": {"samples": ["55", 0], "vae": ["50", 2]}}
    again["57"] = {"class_type": "SaveImage", "inputs": {"images": ["56", 0],
                                                         "filename_prefix": "cmp/bake_reloaded"}}
    assert validate_api_prompt(again, comfy.get("/object_info")) == []  # lists the new file
    h2, messages = comfy.run(again)
    assert h2["status"]["status_str"] == "success", json.dumps(messages)[-3000:]

    patched, original = _latent(comfy, h, "410"), _latent(comfy, h, "420")
    reloaded = _latent(comfy, h2, "550")
    images = [np.asarray(Image.open(comfy.output_file(hist["outputs"][nid]["images"][0])))
              for hist, nid in ((h, "44"), (h2, "57"))]
    diff = float((reloaded - patched).abs().max())
    effect = float((patched - original).abs().max())
    print(f"baked checkpoint vs patched MODEL: max |latent diff| {diff:.2e}, images equal "
          f"{np.array_equal(*images)}; vs original model {effect:.2e}")
    assert torch.equal(reloaded, patched)
    assert np.array_equal(*images)
    assert effect > 1e-3 * max(float(original.abs().max()), 1.0)


def test_save_prefix_outside_loras_is_refused(comfy, erased, tmp_path):
    """A '../' prefix: ComfyUI's own folder_paths refuses the same prefixes the node refuses,
    and through the API the user gets the node's error with the fix; no file is written."""
    prefixes = ["../escape", "spare/../../escape", "/tmp/spare_escape/x", "spare/x",
                "spare/../inside", "a/b/../c"]
    code = ("import json, os, sys\nimport folder_paths\nout = {}\n"
            "for p in json.loads(sys.argv[2]):\n"
            "    try:\n        folder_paths.get_save_image_path(p, sys.argv[1])\n"
            "        out[p] = 'ok'\n"
            "    except Exception as e:\n        out[p] = str(e)\n"
            "print(json.dumps(out))")
    loras = str(tmp_path / "loras")
    os.makedirs(loras)
    real = subprocess.run([sys.executable, "-c", code, loras, json.dumps(prefixes)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                          timeout=300)
    assert real.returncode == 0, real.stderr[-3000:]
    host_says = json.loads(real.stdout.strip().splitlines()[-1])
    refused_by_host = {p for p, r in host_says.items() if r != "ok"}
    assert all("outside the output folder" in host_says[p] for p in refused_by_host)
    file_nodes = sys.modules[load_pack().__name__ + ".nodes.file_nodes"]
    refused_by_node = set()
    for p in prefixes:
        try:
            file_nodes.check_prefix(p)
        except ValueError:
            refused_by_node.add(p)
    assert refused_by_host == refused_by_node == {"../escape", "spare/../../escape",
                                                  "/tmp/spare_escape/x"}

    wf, history, _ = erased
    native = history["outputs"][node_of(wf, "SaveUnlearnAdapter")]["text"][0].replace(
        ".safetensors", ".spare.safetensors")
    run = {"70": {"class_type": "LoadUnlearnAdapter", "inputs": {"adapter_name": native}},
           "71": {"class_type": "SaveUnlearnAdapter", "inputs": {
               "adapter": ["70", 0], "filename_prefix": "../escape", "keep_native": True}}}
    before = sorted(os.path.join(d, f) for d, _, fs in os.walk(comfy.base) for f in fs
                    if "escape" in f)
    h, messages = comfy.run(run)
    errors = [m["data"] for m in messages if m["type"] == "execution_error"]
    assert errors and errors[0]["node_id"] == "71", json.dumps(messages)[-2000:]
    message = errors[0]["exception_message"]
    assert "points outside models/loras" in message and "'spare/erased_concept'" in message
    after = sorted(os.path.join(d, f) for d, _, fs in os.walk(comfy.base) for f in fs
                   if "escape" in f)
    assert before == after == [] and not os.path.exists("/tmp/spare_escape")
    print(f"'../escape' -> {errors[0]['exception_type']}: {message}")


def _adapter_modules(comfy, lora: str) -> set[str]:
    """Module names of a saved native adapter file (``<name>.spare.safetensors``)."""
    from safetensors import safe_open

    native = os.path.join(comfy.base, "models", "loras", lora.replace(".safetensors", ".spare.safetensors"))
    with safe_open(native, "pt") as f:
        return {k.rsplit(".", 1)[0] for k in f.keys()}


def test_memory_controls_on_and_off_both_train(comfy, erased):
    """ComputeSaliency + SparseLoRAInit (module_selection saliency: the ranked path, which the
    shipped workflow skips) + SelfDistillUnlearn with the memory controls explicitly
    on (micro_batch 1, gradient checkpointing, no per-weight scores) and explicitly off (every
    image at once, no checkpointing, per-weight scores kept). At a training batch of 1 the
    controls change only how the saliency images and the pools are batched: both adapters move
    the concept's samples alike. At a batch of 2, "on" trains it as 2 accumulated micro-batches
    of 1 and "off" in one piece: both train and move the samples by a similar amount (not alike:
    the micro-batches draw their latents, timesteps and noise separately)."""
    wf = tiny_workflow()
    ck, empty = node_of(wf, "CheckpointLoaderSimple"), node_of(wf, "EmptyLatentImage")
    unl = node_of(wf, "SelfDistillUnlearn")
    run = keep(wf, [ck, "2", "3", empty])
    settings = {"on": dict(micro_batch=1, gradient_checkpointing=True),
                "off": dict(micro_batch=2, gradient_checkpointing=False)}
    for i, (name, mem) in enumerate(settings.items()):
        s, a, u, ap, sv, u2, ap2 = (str(100 + 10 * i + k) for k in range(7))
        run[s] = saliency_node(wf, **mem, element_scores=name == "off", seed=21)
        run[a] = saliency_init(wf, s)
        for unlearn, apply, batch, sample in ((u, ap, 1, f"9{i}"), (u2, ap2, 2, f"9{i + 3}")):
            run[unlearn] = {"class_type": "SelfDistillUnlearn", "inputs": {
                **wf[unl]["inputs"], **mem, "adapter": [a, 0], "seed": 21, "batch_size": batch}}
            run[apply] = {"class_type": "ApplyUnlearnAdapter",
                          "inputs": {"model": [ck, 0], "adapter": [unlearn, 0], "strength": 1.0}}
            sample_branch(run, sample, [apply, 0], f"memory_{name}_batch{batch}")
        run[sv] = {"class_type": "SaveUnlearnAdapter", "inputs": {
            "adapter": [u, 0], "filename_prefix": f"spare/memory_{name}", "keep_native": True}}
    sample_branch(run, "92", [ck, 0], "memory_base")
    assert validate_api_prompt(run, comfy.info) == []
    t = time.time()
    history, messages = comfy.run(run)
    assert history["status"]["status_str"] == "success", json.dumps(messages)[-3000:]
    progress = {}
    for m in messages:
        if m["type"] == "progress":
            progress.setdefault(m["data"]["node"], []).append((m["data"]["value"], m["data"]["max"]))
    # both saliency and all four training nodes finished
    for nid in ("100", "102", "105", "110", "112", "115"):
        assert progress.get(nid) and progress[nid][-1][0] == progress[nid][-1][1], (nid, progress)

    base = _latent(comfy, history, "920")
    scale = float(base.abs().mean())
    mods = {name: _adapter_modules(comfy, history["outputs"][str(104 + 10 * i)]["text"][0])
            for i, name in enumerate(settings)}
    overlap = len(mods["on"] & mods["off"]) / len(mods["on"] | mods["off"])
    print(f"\nmemory controls on/off ran in {time.time() - t:.0f}s; adapted modules "
          f"{len(mods['on'])} / {len(mods['off'])}, overlap {overlap:.2f}")
    effects = {}
    for batch, (n_on, n_off) in ((1, ("900", "910")), (2, ("930", "940"))):
        on, off = _latent(comfy, history, n_on), _latent(comfy, history, n_off)
        effect_on, effect_off = (float((x - base).abs().mean()) for x in (on, off))
        between = float((on - off).abs().mean())
        effects[batch] = effect_on, effect_off, between
        print(f"training batch {batch}: mean |effect| on the concept's latents {effect_on:.3e} / "
              f"{effect_off:.3e}, on vs off {between:.3e}")
        assert effect_on > 1e-3 * scale and effect_off > 1e-3 * scale, batch
    effect_on, effect_off, between = effects[1]
    assert 0.5 < effect_on / effect_off < 2.0 and between < 0.25 * min(effect_on, effect_off)
    effect_on, effect_off, _ = effects[2]
    assert 0.25 < effect_on / effect_off < 4.0
    assert overlap >= 0.5


UNET_FILE = "tiny_sd15_unet.safetensors"
ROUNDED_FILE = "tiny_sd15_unet_fp8_values.safetensors"


def _unet_only_file(comfy, fp8_values: bool = False) -> str:
    """The checkpoint's UNet saved alone (diffusion-model keys, no prefix), as a file the stock
    UNETLoader lists (models/diffusion_models); ``fp8_values``: every Linear/Conv weight rounded
    through float8_e4m3fn and saved in float32, so that weight_dtype default and fp8_e4m3fn load
    the same numbers."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = os.path.join(comfy.base, "models", "diffusion_models")
    name = ROUNDED_FILE if fp8_values else UNET_FILE
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        prefix = "model.diffusion_model."
        with safe_open(os.path.join(comfy.base, "models", "checkpoints", CKPT), "pt") as f:
            sd = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        if fp8_values:
            sd = {k: (v.to(torch.float8_e4m3fn).float() if k.endswith(".weight") and v.dim() >= 2
                      else v.float()) for k, v in sd.items()}
        save_file(sd, path)
    return name


def test_adapter_on_fp8_weights_samples_what_it_computes(comfy, erased):
    """One UNet file whose weights are fp8 values (saved in float32), loaded twice by the stock
    UNETLoader: weight_dtype default (float32 weights) and fp8_e4m3fn (the same numbers stored in
    fp8, cast per call). A LoRA trained on the fp8 model is applied to both: on the float32 model
    as a weight patch (W + delta, exact: the function the adapter computes), on the fp8 model as
    a weight wrapper after the cast. The two KSamplers' latents agree to float rounding (bound:
    1e-3 of the latents' scale), while the adapter moves the latents by far more."""
    wf = tiny_workflow()
    ck, init, unl = (node_of(wf, k) for k in ("CheckpointLoaderSimple", "SparseLoRAInit",
                                               "SelfDistillUnlearn"))
    name = _unet_only_file(comfy, fp8_values=True)
    run = keep(wf, [ck, "2", "3", node_of(wf, "EmptyLatentImage")])
    run["70"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name,
                                                        "weight_dtype": "fp8_e4m3fn"}}
    run["71"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name,
                                                        "weight_dtype": "default"}}
    run[init] = {"class_type": "SparseLoRAInit", "inputs": {**wf[init]["inputs"],
                                                           "model": ["70", 0]}}
    run[unl] = {"class_type": "SelfDistillUnlearn", "inputs": {
        **wf[unl]["inputs"], "model": ["70", 0], "steps": 3, "seed": 5}}
    for nid, src in (("72", "70"), ("73", "71")):
        run[nid] = {"class_type": "ApplyUnlearnAdapter",
                    "inputs": {"model": [src, 0], "adapter": [unl, 0], "strength": 1.0}}
    sample_branch(run, "74", ["72", 0], "fp8_wrapped")
    sample_branch(run, "75", ["73", 0], "fp32_patched")
    sample_branch(run, "76", ["70", 0], "fp8_plain")
    assert validate_api_prompt(run, comfy.get("/object_info")) == []  # lists the new file
    history, messages = comfy.run(run)
    assert history["status"]["status_str"] == "success", json.dumps(messages)[-3000:]
    wrapped, patched, plain = (_latent(comfy, history, n + "0") for n in ("74", "75", "76"))
    scale = float(patched.abs().max())
    diff = float((wrapped - patched).abs().max())
    effect = float((patched - plain).abs().max())
    print(f"\nfp8 MODEL + adapter vs float32 MODEL of the same values + adapter: max |latent "
          f"difference| {diff:.2e}; the adapter's effect {effect:.2e} (latent scale {scale:.2f})")
    assert diff <= 1e-3 * max(scale, 1.0) and effect > 100 * max(diff, 1e-6)


def test_fp8_storage_saliency_and_lora_train(comfy, erased):
    """The UNet loaded by the stock UNETLoader with weight_dtype fp8_e4m3fn (ComfyUI computes in
    its manual-cast dtype). Three LoRAs train on it: the shipped path (SparseLoRAInit's shipped
    selection on the fp8 UNet itself -> SelfDistillUnlearn); a LoRA placed by a saliency map of
    the normally loaded checkpoint; and one placed by ComputeSaliency on the fp8 UNet itself
    (each layer's weight gradient read from the bf16 copy its manual cast makes). The two
    saliency maps rank from different concept images (sampled by the fp8 and the full-precision
    model), so their selections agree only up to fp8 rounding: at least half of the modules."""
    wf = tiny_workflow()
    ck, init, unl = (node_of(wf, k) for k in ("CheckpointLoaderSimple", "SparseLoRAInit",
                                               "SelfDistillUnlearn"))
    unet_name = _unet_only_file(comfy)
    info = comfy.get("/object_info")
    assert unet_name in info["UNETLoader"]["input"]["required"]["unet_name"][0]
    fp8 = {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name,
                                                  "weight_dtype": "fp8_e4m3fn"}}

    trains = keep(wf, [ck, "2", "3", node_of(wf, "EmptyLatentImage")])
    trains["70"] = fp8
    # the shipped path on the fp8 UNet: SparseLoRAInit (the recipe's selection) -> Unlearn
    trains[init] = {"class_type": "SparseLoRAInit", "inputs": {**wf[init]["inputs"],
                                                               "model": ["70", 0]}}
    assert trains[init]["inputs"]["module_selection"] == SHIPPED
    trains[unl] = {"class_type": "SelfDistillUnlearn", "inputs": {
        **wf[unl]["inputs"], "model": ["70", 0], "steps": 4, "seed": 31}}
    # a LoRA placed by the saliency map of the normally loaded checkpoint, trained on fp8
    trains["80"] = saliency_node(wf, seed=31)
    trains["81"] = saliency_init(wf, "80")
    trains["82"] = {"class_type": "SelfDistillUnlearn", "inputs": {
        **wf[unl]["inputs"], "model": ["70", 0], "adapter": ["81", 0], "steps": 4, "seed": 31}}
    # a LoRA placed by ComputeSaliency on the fp8 UNet itself
    trains["71"] = saliency_node(wf, model=["70", 0], seed=31)
    trains["72"] = {"class_type": "SaliencyPreview", "inputs": {
        "saliency": ["71", 0], "reduce": "mean", "max_modules": 10}}
    trains["73"] = {"class_type": "PreviewImage", "inputs": {"images": ["72", 0]}}
    trains["78"] = saliency_init(wf, "71")
    trains["79"] = {"class_type": "SelfDistillUnlearn", "inputs": {
        **wf[unl]["inputs"], "model": ["70", 0], "adapter": ["78", 0], "steps": 4, "seed": 31}}
    branches = {"shipped": (unl, "74", "75", "76"), "saliency": ("82", "84", "85", "86"),
                "fp8_saliency": ("79", "87", "88", "89")}
    for name, (u, save, apply, sample) in branches.items():
        trains[save] = {"class_type": "SaveUnlearnAdapter", "inputs": {
            "adapter": [u, 0], "filename_prefix": f"spare/fp8_{name}", "keep_native": True}}
        trains[apply] = {"class_type": "ApplyUnlearnAdapter",
                         "inputs": {"model": ["70", 0], "adapter": [u, 0], "strength": 1.0}}
        sample_branch(trains, sample, [apply, 0], f"fp8_{name}")
    sample_branch(trains, "77", ["70", 0], "fp8_base")
    assert validate_api_prompt(trains, info) == []
    t = time.time()
    history, messages = comfy.run(trains)
    assert history["status"]["status_str"] == "success", json.dumps(messages)[-3000:]
    took = time.time() - t

    from safetensors.torch import load_file
    base = _latent(comfy, history, "770")
    salience = [m["data"] for m in messages if m["type"] == "progress" and m["data"]["node"] == "71"]
    assert salience and salience[-1]["value"] == salience[-1]["max"], salience
    assert history["outputs"]["73"]["images"]  # the fp8 saliency map, previewed
    chosen = {}
    for name, (u, save, _, sample) in branches.items():
        steps = [m["data"] for m in messages if m["type"] == "progress" and m["data"]["node"] == u]
        assert steps and steps[-1]["value"] == steps[-1]["max"], (name, steps)
        lora = history["outputs"][save]["text"][0]
        tensors = load_file(os.path.join(comfy.base, "models", "loras",
                                         lora.replace(".safetensors", ".spare.safetensors")))
        ups = [v for k, v in tensors.items() if k.endswith("lora_B")]
        assert ups and all(v.isfinite().all() for v in tensors.values()), name
        trained = max(float(v.abs().max()) for v in ups)  # lora_B starts at zero
        mods = _adapter_modules(comfy, lora)
        if name == "shipped":
            assert is_shipped_selection(mods), sorted(mods)
        chosen[name] = mods
        effect = float((_latent(comfy, history, sample + "0") - base).abs().max())
        print(f"{name} LoRA on the fp8 UNet ({len(mods)} modules): {len(steps)} progress "
              f"updates, max |lora_B| {trained:.2e}, effect on the fp8 model's latents "
              f"{effect:.2e}")
        assert trained > 0 and effect > 0, name
    same = len(chosen["saliency"] & chosen["fp8_saliency"]) / len(chosen["saliency"])
    print(f"the three fp8 trainings ran in {took:.0f}s; the fp8 saliency map chose "
          f"{same:.0%} of the modules the full-precision one chose")
    assert len(chosen["fp8_saliency"]) == len(chosen["saliency"]) and same >= 0.5, same


@pytest.mark.parametrize("adversarial", [False, True])
def test_probe_group_finds_a_prompt_on_the_patched_model(comfy, adversarial):
    """The UI file's bypassed *Probe the erasure* group, enabled as a user would (Ctrl+B) and
    queued as the frontend queues it, with the chain that trains the adapter (tiny settings):
    ProbeErasure runs its attack through this ComfyUI's CLIP-L (SD1ClipModel.clip_l, its token
    embedding hooked) with gradients under the host's inference mode, shows the found prompt
    (the concept after at most ``attack_tokens`` words) and both LATENTs decode to previews.
    With SelfDistillUnlearn's ``adversarial`` switch on, training runs the same attack every few
    steps and encodes its swapped target through this CLIP's tokenizer."""
    from PIL import Image

    with open(os.path.join(REPO, "workflows", "spare_erase_concept.json")) as f:
        ui = json.load(f)
    for n in ui["nodes"]:
        if n["mode"] == BYPASSED and n["type"] != "CheckpointSave":
            n["mode"] = 0  # the probe group's nodes
        if n["type"] == "CheckpointLoaderSimple":
            n["widgets_values"][0] = CKPT
    queued = tiny_workflow(ui_to_api(ui, comfy.info))
    probe = node_of(queued, "ProbeErasure")
    wanted = ("CheckpointLoaderSimple", "SparseLoRAInit", "SelfDistillUnlearn",
              "ApplyUnlearnAdapter", "ProbeErasure")
    ids = [k for k, v in queued.items() if v["class_type"] in wanted
           or v["inputs"].get("samples", [None])[0] == probe]
    previews = [k for k, v in queued.items() if v["class_type"] == "PreviewImage"
                and v["inputs"]["images"][0] in ids  # the probe's two, not the loss chart
                and queued[v["inputs"]["images"][0]]["class_type"] != "SelfDistillUnlearn"]
    run = keep(queued, ids + previews)
    run[node_of(run, "SelfDistillUnlearn")]["inputs"]["adversarial"] = adversarial
    assert len(previews) == 2 and validate_api_prompt(run, comfy.info) == []
    concept = run[probe]["inputs"]["concept"]
    tokens = run[probe]["inputs"]["attack_tokens"]
    t = time.time()
    said = comfy.log_text().count("SelfDistillUnlearn adversarial:")
    history, messages = comfy.run(run)
    assert history["status"]["status_str"] == "success", json.dumps(messages)[-3000:]
    # the switch reached training: the node reports its attack rounds only when it is on
    assert comfy.log_text().count("SelfDistillUnlearn adversarial:") == said + adversarial
    found = history["outputs"][probe]["text"][0]
    assert found.endswith(" " + concept) and len(found[:-len(concept)].split()) == tokens
    steps = [m["data"] for m in messages if m["type"] == "progress" and m["data"]["node"] == probe]
    total = 3 * run[probe]["inputs"]["sample_steps"] + run[probe]["inputs"]["attack_steps"]
    assert steps and steps[-1]["value"] == steps[-1]["max"] == total, steps
    images = []
    for nid in previews:
        (item,) = history["outputs"][nid]["images"]
        images.append(Image.open(comfy.output_file(item)))
    assert all(im.size == (64, 64) for im in images)
    assert images[0].tobytes() != images[1].tobytes()  # found prompt vs plain concept
    print(f"\nProbeErasure found {found!r} ({len(steps)} progress updates, {time.time() - t:.0f}s "
          "with the training chain)")
