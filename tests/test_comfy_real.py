"""The pack inside a real ComfyUI: skipped unless ``COMFYUI_ROOT`` points to a checkout.

Run it inside ComfyUI's own environment (it starts ``main.py --cpu`` with that interpreter)::

    COMFYUI_ROOT=/work/comfy/ComfyUI /work/comfy/venv/bin/python -m pytest tests/test_comfy_real.py -s

What it does, all through ComfyUI's HTTP/websocket API as a headless client would:
1. builds the smallest SD1.5-shaped checkpoint ComfyUI's detection accepts (SD15 needs
   model_channels 320 and context_dim 768, read from the weights: one level with one ResBlock and
   the one transformer block that carries context_dim, output blocks without transformers, no
   middle block; a full-size random CLIP-L, since ComfyUI builds CLIP-L from a fixed config; a
   TAESD-keyed VAE), in a temporary base directory;
2. starts ComfyUI with this repository linked into ``custom_nodes/`` (loaded as ComfyUI loads any
   pack), checks ``/object_info`` against the pack and the stock-node table of the unit tests;
3. validates and queues the shipped API workflow (sizes and steps made tiny), follows progress
   on the websocket and checks ``/history`` and the files written;
4. checks that the saved LoRA in the stock LoraLoader samples the same latents as
   LoadUnlearnAdapter -> ApplyUnlearnAdapter, and differs from the original model;
5. interrupts a long unlearning run: no adapter file appears and the original model still
   samples bit-identical latents;
6. runs DataUnlearn (SISS) on IMAGE batches made by the stock EmptyImage node, encoded by the
   checkpoint's VAE: the adapter saves, applies, and changes the samples of the original model.
"""
from __future__ import annotations

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

from comfy_double import (FILE_LIST, REPO, STOCK_NODES, Host, load_pack, node_info,
                          validate_api_prompt, validate_ui_workflow)

ROOT = os.environ.get("COMFYUI_ROOT")
pytestmark = pytest.mark.skipif(
    not ROOT, reason="COMFYUI_ROOT is not set: point it at a ComfyUI checkout and run this test "
                     "with that ComfyUI's Python (see the module docstring)")

CKPT = "tiny_sd15.safetensors"
OURS = ("ComputeSaliency", "SaliencyPreview", "SparseLoRAInit", "SelfDistillUnlearn",
        "DataUnlearn", "ApplyUnlearnAdapter", "SaveUnlearnAdapter", "LoadUnlearnAdapter")

BUILD = r'''
import sys, torch
from comfy.cli_args import args
args.cpu = True
import comfy.ops, comfy.taesd.taesd as taesd
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

g = torch.Generator().manual_seed(0)
def rand(key, shape):
    if key.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return torch.randn(shape, generator=g) / fan_in ** 0.5

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
def tiny_workflow() -> dict:
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
            inputs.update(samples=2, top_k=8, sample_steps=3)
        if kind == "SelfDistillUnlearn":
            inputs.update(steps=6, lr=1e-2, batch_size=1, pool_size=2, pool_steps=3)
        if kind == "SaveUnlearnAdapter":
            inputs["filename_prefix"] = "spare/test_erased"
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
    assert images["Before"].size == images["After"].size == (64, 64)
    assert images["Where the concept lives"].size[0] == 900
    lora = outputs[node_of(wf, "SaveUnlearnAdapter")]["text"][0]
    assert lora == "spare/test_erased_00001_.safetensors"
    loras = os.path.join(comfy.base, "models", "loras")
    assert os.path.isfile(os.path.join(loras, lora))
    native = os.path.join(loras, lora.replace(".safetensors", ".spare.safetensors"))
    from safetensors import safe_open
    with safe_open(native, "pt") as f:  # concept typed once, in ComputeSaliency
        assert f.metadata()["concept"] == wf[node_of(wf, "ComputeSaliency")]["inputs"]["concept"]
    progress = {}
    for m in messages:
        if m["type"] == "progress":
            progress.setdefault(m["data"]["node"], []).append((m["data"]["value"], m["data"]["max"]))
    for kind in ("ComputeSaliency", "SelfDistillUnlearn"):
        updates = progress.get(node_of(wf, kind))
        assert updates and updates[-1][0] == updates[-1][1], (kind, updates)
    print(f"outputs: {sorted(images)}, {lora}; progress updates: "
          f"{ {wf[k]['class_type']: len(v) for k, v in progress.items()} }")


def _latent(comfy, history: dict, nid: str):
    from safetensors.torch import load_file

    item = history["outputs"][nid]["latents"][0]
    return load_file(comfy.output_file(item))["latent_tensor"]


def masked_adapter(comfy) -> str:
    """Train and save an element-masked adapter (saved with full-difference keys); its LoRA name."""
    wf = tiny_workflow()
    ids = [node_of(wf, k) for k in ("CheckpointLoaderSimple", "ComputeSaliency", "SparseLoRAInit",
                                    "SelfDistillUnlearn", "SaveUnlearnAdapter")]
    run = keep(wf, ids)
    run[ids[2]]["inputs"]["sparsity"] = 0.5
    run[ids[3]]["inputs"]["steps"] = 3
    run[ids[4]]["inputs"]["filename_prefix"] = "spare/test_masked"
    history, messages = comfy.run(run)
    assert history["status"]["status_str"] == "success", json.dumps(messages)[-3000:]
    return history["outputs"][ids[4]]["text"][0]


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
    ck, empty = node_of(wf, "CheckpointLoaderSimple"), node_of(wf, "EmptyLatentImage")
    cmp = keep(wf, [ck, "2", "3", empty])
    cmp["30"] = {"class_type": "LoraLoader", "inputs": {
        "model": [ck, 0], "clip": [ck, 1], "lora_name": lora, "strength_model": 0.8,
        "strength_clip": 1.0}}
    cmp["31"] = {"class_type": "LoadUnlearnAdapter",
                 "inputs": {"adapter_name": lora.replace(".safetensors", ".spare.safetensors")}}
    cmp["32"] = {"class_type": "ApplyUnlearnAdapter",
                 "inputs": {"model": [ck, 0], "adapter": ["31", 0], "strength": 0.8}}
    sample_branch(cmp, "40", ["30", 0], "lora")
    sample_branch(cmp, "41", ["32", 0], "apply")
    sample_branch(cmp, "42", [ck, 0], "base")
    assert validate_api_prompt(cmp, comfy.get("/object_info")) == []  # lists the new LoRA
    h, messages = comfy.run(cmp)
    assert h["status"]["status_str"] == "success", json.dumps(messages)[-3000:]
    via_lora, via_apply, base = (_latent(comfy, h, n) for n in ("400", "410", "420"))
    scale = float(base.abs().max())
    diff = float((via_lora - via_apply).abs().max())
    effect = float((via_apply - base).abs().max())
    print(f"{kind} LoRA ({len(keys)} keys): LoraLoader vs ApplyUnlearnAdapter max |diff| "
          f"{diff:.2e}; adapter effect {effect:.2e} (latent scale {scale:.2f})")
    assert diff <= 1e-4 * max(scale, 1.0)
    assert effect > 100 * max(diff, 1e-6)
    log = comfy.log_text()
    assert "lora key not loaded" not in log and "NOT LOADED" not in log
    comfy.base_latent = base


def test_interrupt_leaves_no_file_and_the_model_unchanged(comfy, erased):
    wf = tiny_workflow()
    ck, unl, save = (node_of(wf, k) for k in ("CheckpointLoaderSimple", "SelfDistillUnlearn",
                                               "SaveUnlearnAdapter"))
    run = keep(wf, [ck, node_of(wf, "ComputeSaliency"), node_of(wf, "SparseLoRAInit"), unl, save])
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
        "parameterization": "lora", "seed": 3, "rank": 2, "batch_size": 1}}
    run["63"] = {"class_type": "SaveUnlearnAdapter", "inputs": {
        "adapter": ["62", 0], "filename_prefix": "spare/test_data", "keep_native": True}}
    run["64"] = {"class_type": "ApplyUnlearnAdapter",
                 "inputs": {"model": [ck, 0], "adapter": ["62", 0], "strength": 1.0}}
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
    after, base = _latent(comfy, history, "650"), _latent(comfy, history, "660")
    effect = float((after - base).abs().max())
    assert effect > 0
    print(f"DataUnlearn (siss, 4 steps) ran in {time.time() - t:.0f}s, saved {lora}; "
          f"adapter effect on latents {effect:.2e}")
