"""Per-concept training, then fusion (spare_core.multi_concept, spare_core.fusion): the list's
latent pools are sampled once, one per prompt; each job equals a single-concept run on them with
the list's other concepts preserved; each fusion's algebra; the fused
adapter's files; the same run over 2 gloo processes (torchrun) equals the one-process run; a
failing rank stops every rank with one clear error and no file; the CLI's list file."""
import os
import subprocess
import sys

import pytest
import torch

from spare_core.concept_list import DEFAULT_FUSION
from spare_core import load_adapter, save_adapter, to_comfy_lora
from spare_core.adapter import LoRADelta, MaskedFullDelta, UnlearnAdapter
from spare_core.cli import main
from spare_core.concept_list import parse_concept_list, plan_jobs
from spare_core.files import read_safetensors
from spare_core.fusion import (GramSums, fuse_least_squares, fuse_sum, fuse_ties, ties_merge)
from spare_core.methods import run_method
from spare_core.multi_concept import ConceptJobError, list_pools, ls_inputs, unlearn_concepts
from test_cli import pipe_dir  # noqa: F401  (the tiny pipeline folder fixture)
from tiny_models import tiny_denoiser

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FAST = dict(steps=2, num_samples=2, sample_steps=2, batch_size=2, seed=0)


@pytest.fixture(scope="module")
def den():
    return tiny_denoiser(0)


def _equal_adapters(a, b):
    ta, tb = a.to_tensors()[0], b.to_tensors()[0]
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _list_pools(den, prompts):
    """The pools unlearn_concepts samples at FAST for ``prompts`` (concepts, then preserved)."""
    from spare_core.recipes import guidance_for
    from spare_core.tasks import PoolConfig

    pool = PoolConfig(size=FAST["num_samples"], steps=FAST["sample_steps"],
                      guidance=guidance_for(den, None))
    return list_pools(den, prompts, pool, FAST["seed"])


def test_each_job_equals_a_single_concept_run_on_the_lists_pools(den):
    res = unlearn_concepts("spare", den, ["a red circle", "a blue square"], "a green line",
                           ["a purple star"], **FAST)
    pools = _list_pools(den, ["a red circle", "a blue square", "a purple star", ""])
    for part, (concept, other) in zip(res.parts, [("a red circle", "a blue square"),
                                                  ("a blue square", "a red circle")]):
        alone = run_method("spare", den, concept=concept, surrogate="a green line",
                           preserve=["a purple star", other], concept_latents=pools[concept],
                           preserve_latents=pools, **FAST)
        _equal_adapters(part, alone.adapter)
    assert [j["concept"] for j in res.history["jobs"]] == ["a red circle", "a blue square"]
    assert res.adapter.meta["concept"] == "a red circle\na blue square"
    assert res.adapter.meta["fusion"] == DEFAULT_FUSION == "least_squares"


def test_a_list_samples_each_prompts_pool_once(den, monkeypatch):
    """k concepts and P shared preserved prompts (the empty one among them): k + P pools for
    the whole list, from list_pools, none in the jobs (k single runs would sample k (1 + P)).
    That a pool does not depend on the ranks' split is the 2-process test's (the same file)."""
    import spare_core.spare as spare
    import spare_core.tasks as tasks

    calls = []
    real = tasks.sample

    def counted(d, prompts, **kw):  # every pool, the list's or a job's, is sampled here
        calls.append(list(prompts))
        return real(d, prompts, **kw)

    def refused(*a, **k):
        raise AssertionError("a job sampled its concept images the list had")

    monkeypatch.setattr(tasks, "sample", counted)
    monkeypatch.setattr(spare, "sample", refused)
    concepts = ["a red circle", "a blue square", "a yellow dot"]
    unlearn_concepts("spare", den, concepts, "a green line", ["a purple star"], **FAST)
    assert sorted(c[0] for c in calls) == sorted(concepts + ["a purple star", ""])
    assert all(len(c) == FAST["num_samples"] and len(set(c)) == 1 for c in calls)


def test_least_squares_inputs_read_the_pools_round_robin():
    pools = {"c1": torch.arange(3.0).view(3, 1, 1, 1), "c2": torch.arange(3.0, 6.0).view(3, 1, 1, 1),
             "k": torch.full((2, 1, 1, 1), 10.0), "": torch.full((2, 1, 1, 1), 20.0)}
    mine, kept = ls_inputs(pools, ["c1", "c2"], ["k", ""], samples=2)
    assert mine[0][0] == ["c1", "c1"] and torch.equal(mine[1][1], pools["c2"][:2])
    assert kept[0] == ["k", "", "k", ""][:2]
    mine, kept = ls_inputs(pools, ["c1"], ["k", ""], samples=8)  # each pool holds 2: 4 rows
    assert len(mine[0][0]) == 3 and kept[0] == ["k", "", "k", ""]
    assert kept[1].flatten().tolist() == [10.0, 20.0, 10.0, 20.0]
    assert ls_inputs(pools, ["c1"], [], samples=2)[1] is None


def test_given_pools_are_checked_and_not_sampled_again(den, monkeypatch):
    import spare_core.spare as spare
    import spare_core.tasks as tasks

    pools = _list_pools(den, ["a red circle", "a purple star", ""])
    with pytest.raises(ValueError, match="latents must be"):
        run_method("spare", den, concept="a red circle", concept_latents=torch.zeros(2, 1, 2, 2),
                   **FAST)
    with pytest.raises(ValueError, match="takes no latent pools"):
        run_method("uce", den, concept="a red circle", concept_latents=pools["a red circle"])
    monkeypatch.setattr(spare, "sample", lambda *a, **k: pytest.fail("sampled the concept"))
    seen = []
    real = tasks.sample
    monkeypatch.setattr(tasks, "sample", lambda d, p, **k: seen.append(p[0]) or real(d, p, **k))
    run_method("spare", den, concept="a red circle", preserve=["a purple star", "a moon"],
               concept_latents=pools["a red circle"], preserve_latents=pools, **FAST)
    assert seen == ["a moon"]  # only the prompt the pools lacked


def test_plan_adds_the_other_concepts_to_each_preserve_set():
    jobs = plan_jobs([("a", "x"), ("b", "y"), ("c", "x")], ["keep"])
    assert [j.preserve for j in jobs] == [("keep", "b", "c"), ("keep", "a", "c"),
                                          ("keep", "a", "b")]
    with pytest.raises(ValueError, match="itself erased"):
        plan_jobs([("a", "b"), ("b", "x")])
    with pytest.raises(ValueError, match="also listed as a preserved"):
        plan_jobs([("a", "x")], ["A"])


def _lora(shape, rank, seed, mask=None):
    g = torch.Generator().manual_seed(seed)
    d = LoRADelta(shape, rank, float(rank) * 0.5, mask, g)
    with torch.no_grad():
        d.lora_B.normal_(generator=g)
    return d


def _adapters():
    a = UnlearnAdapter({"l1": _lora((6, 5), 2, 0), "c1": _lora((4, 3, 3, 3), 1, 1)})
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(2)) > 0.5
    b = UnlearnAdapter({"l1": _lora((6, 5), 1, 3, mask), "l2": _lora((3, 6), 2, 4)})
    b.strength = 0.5
    return a, b


def test_sum_is_the_sum_of_the_deltas():
    a, b = _adapters()
    for rank in (None, 0, 9):
        fused = fuse_sum([a, b], rank=rank).merged()
        ma, mb = a.merged(), b.merged()
        assert set(fused) == {"l1", "c1", "l2"}
        torch.testing.assert_close(fused["l1"], ma["l1"] + mb["l1"])
        torch.testing.assert_close(fused["c1"], ma["c1"])
        torch.testing.assert_close(fused["l2"], mb["l2"])
    only_loras = fuse_sum([a, UnlearnAdapter({"l1": _lora((6, 5), 2, 5)})])
    assert only_loras["l1"].rank == 4  # dense LoRAs are concatenated: exact, no SVD


def test_ties_on_a_hand_made_example():
    d1 = torch.tensor([[4.0, -1.0, 0.5, 3.0]])
    d2 = torch.tensor([[2.0, 2.0, -6.0, -1.0]])
    d3 = torch.tensor([[-1.0, 3.0, 0.2, 0.5]])
    # density 0.5 keeps the 2 largest magnitudes of each: [4,0,0,3], [0,2,-6,0], [-1,3,0,0]
    # elected signs (sums): [+3, +5, -6, +3]; means of the agreeing values: [4, 2.5, -6, 3]
    # (the -1 of column 0 disagrees with the elected sign and is dropped)
    torch.testing.assert_close(ties_merge([d1, d2, d3], density=0.5),
                               torch.tensor([[4.0, 2.5, -6.0, 3.0]]))
    a = UnlearnAdapter({"m": MaskedFullDelta((1, 4), torch.ones(1, 4, dtype=torch.bool))})
    b = UnlearnAdapter({"m": MaskedFullDelta((1, 4), torch.ones(1, 4, dtype=torch.bool))})
    with torch.no_grad():
        a["m"].values.copy_(d1)
        b["m"].values.copy_(d2)
    torch.testing.assert_close(fuse_ties([a, b], density=0.5, rank=0)["m"].delta(),
                               ties_merge([d1, d2], 0.5))
    with pytest.raises(ValueError, match="density"):
        ties_merge([d1], 0.0)


def test_least_squares_keeps_each_delta_on_its_inputs_and_the_preserved_ones_unchanged():
    """Inputs of concept 1, concept 2 and the preserved prompts span disjoint coordinates: the
    solve is exact, each concept's delta acts on its own inputs, preserved inputs see none."""
    g = torch.Generator().manual_seed(0)
    n_in, out = 8, 5
    basis = torch.eye(n_in)

    def inputs(cols):
        return basis[:, cols] @ torch.randn(len(cols), 20, generator=g)  # [in, n]

    x1, x2, xp = inputs([0, 1]), inputs([2, 3, 4]), inputs([5, 6])
    a = UnlearnAdapter({"m": _lora((out, n_in), 2, 1)})
    b = UnlearnAdapter({"m": _lora((out, n_in), 2, 2)})
    sums = GramSums({"m": (out, n_in)})
    for ad, x in ((a, x1), (b, x2)):
        sums.add(ad.merged(), {"m": x @ x.T / x.shape[1]})
    sums.set_preserve({"m": xp @ xp.T / xp.shape[1]})
    for rank in (0, None):  # dense, and the sum of the ranks (the solution's rank here)
        fused = fuse_least_squares([a, b], sums, ridge=1e-9, rank=rank).merged()["m"]
        torch.testing.assert_close(fused @ x1, a.merged()["m"] @ x1, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fused @ x2, b.merged()["m"] @ x2, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fused @ xp, torch.zeros(out, xp.shape[1]), atol=1e-4, rtol=0)


def test_least_squares_solves_again_at_another_preserve_weight():
    """``preserve_weight`` changed after ``set_preserve`` solves as ``set_preserve(.., w)`` does
    (the benchmark's rows at several weights from one run), and a heavier weight pulls the
    fused delta toward zero on the preserved inputs, where the concepts' inputs overlap them."""
    g = torch.Generator().manual_seed(1)
    x1, xp = torch.randn(6, 30, generator=g), torch.randn(6, 30, generator=g)
    a = UnlearnAdapter({"m": _lora((4, 6), 2, 1)})
    grams = {"m": x1 @ x1.T / 30}, {"m": xp @ xp.T / 30}

    def solved(weight, reweight=None):
        sums = GramSums({"m": (4, 6)})
        sums.add(a.merged(), grams[0])
        sums.set_preserve(grams[1], weight)
        if reweight is not None:
            sums.preserve_weight = reweight
        return fuse_least_squares([a], sums).merged()["m"]

    torch.testing.assert_close(solved(1.0, reweight=16.0), solved(16.0))
    on_kept = [float((solved(w) @ xp).norm()) for w in (1.0, 16.0)]
    assert on_kept[1] < 0.5 * on_kept[0], on_kept


def test_least_squares_run_on_a_model(den):
    res = unlearn_concepts("spare", den, ["a red circle", "a blue square"],
                           ["a green line", "a yellow dot"], ["a purple star"],
                           fusion="least_squares", ls_samples=2, **FAST)
    merged = res.adapter.merged()
    assert res.adapter.meta["fusion"] == "least_squares"
    assert all(torch.isfinite(d).all() for d in merged.values())
    assert any(float(d.abs().max()) > 0 for d in merged.values())


@pytest.mark.parametrize("fusion", ["sum", "ties"])
def test_the_fused_adapter_round_trips_through_the_files(den, tmp_path, fusion):
    res = unlearn_concepts("spare", den, "a red circle\na blue square", "a green line",
                           fusion=fusion, **FAST)
    path = str(tmp_path / "fused.safetensors")
    save_adapter(res.adapter, path, unet=den.unet)
    back = load_adapter(path, unet=den.unet)
    for n, d in res.adapter.merged().items():
        torch.testing.assert_close(back.merged()[n], d)
    assert back.meta["fusion"] == fusion and back.meta["per_concept"] == "true"
    sd = to_comfy_lora(res.adapter)
    n = res.adapter.names[0]
    key = "lora_unet_" + n.replace(".", "_")
    up, down = sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"]
    scale = float(sd[f"{key}.alpha"]) / down.shape[0]
    want = res.adapter.merged()[n]
    torch.testing.assert_close((up.flatten(1) @ down.flatten(1) * scale).view(want.shape), want)


def _torchrun(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_two_gloo_processes_write_the_one_process_files(tmp_path):
    sys.path.insert(0, HERE)
    import per_concept_worker

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    assert per_concept_worker.run(str(one)) == 0
    run = _torchrun(os.path.join(HERE, "per_concept_worker.py"), "--out", str(two))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 1/2" in run.stderr  # each rank draws its own bars
    for fusion in ("sum", "ties", "least_squares"):
        a, ma = read_safetensors(str(one / f"{fusion}.safetensors"))
        b, mb = read_safetensors(str(two / f"{fusion}.safetensors"))
        assert set(a) == set(b) and ma["concept"] == mb["concept"]
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_a_failing_rank_stops_all_with_one_clear_error_and_no_file(tmp_path):
    run = _torchrun(os.path.join(HERE, "per_concept_worker.py"), "--out", str(tmp_path),
                    "--fail-rank", "1")
    assert run.returncode != 0
    msg = ("per-concept unlearning failed, nothing was written: rank 1 failed on concept "
           "'a handwritten digit five' (job 2/2): RuntimeError: injected failure")
    assert run.stderr.count(msg) == 2  # both ranks raise it
    assert os.listdir(tmp_path) == []


def test_one_process_failure_names_the_concept(den, monkeypatch):
    import spare_core.multi_concept as mc

    def fail(method, denoiser, job, *a):
        raise RuntimeError("boom")
    monkeypatch.setattr(mc, "_train_job", fail)
    with pytest.raises(ConceptJobError, match="concept 'a red circle' .job 1/2. failed: "
                                              "RuntimeError: boom"):
        unlearn_concepts("spare", den, ["a red circle", "a blue square"], **FAST)


# ---- the CLI's list file ----
def test_concept_list_lines():
    text = "# styles\nVan Gogh style | a painting\n\n  Monet style  \n"
    assert parse_concept_list(text, "an image") == [("Van Gogh style", "a painting"),
                                                    ("Monet style", "an image")]


@pytest.mark.parametrize("text, match", [
    ("a cat\n | a dog\n", r"list.txt line 2 \('\| a dog'\): the concept before '\|' is empty"),
    ("a cat | a dog | a fox\n", "line 1 .*one '|' at most"),
    ("a cat\nA  Cat | x\n", "line 2 .*'A  Cat' is already listed on line 1"),
    ("a cat | a cat\n", "line 1 .*surrogate equals the concept"),
    ("# nothing\n\n", "holds no concept"),
])
def test_bad_list_lines_are_named(text, match):
    with pytest.raises(ValueError, match=match):
        parse_concept_list(text, source="list.txt")


def _cli(pipe_dir, listed, out, *extra):
    return ["unlearn", "--model", pipe_dir, "--concept-list", listed, "--surrogate", "a dog",
            "--preserve", "the ocean", "--out", out, "--steps", "2", "--num-samples", "2",
            "--sample-steps", "2", "--device", "cpu", *extra]


def test_cli_list_file_per_concept_and_its_errors(pipe_dir, tmp_path, capsys):
    listed = tmp_path / "list.txt"
    listed.write_text("a cat\na fox | a cow\n")
    out = str(tmp_path / "fused.safetensors")
    assert main(_cli(pipe_dir, str(listed), out, "--per-concept", "--fusion", "ties")) == 0
    ad = load_adapter(out)
    assert ad.meta["concept"] == "a cat\na fox" and ad.meta["surrogate"] == "a dog\na cow"
    assert ad.meta["fusion"] == "ties" and "fused by ties" in capsys.readouterr().out
    listed.write_text("a cat\n\na fox | a cow | an owl\n")
    bad = str(tmp_path / "bad.safetensors")
    assert main(_cli(pipe_dir, str(listed), bad, "--per-concept")) == 2
    assert f"{listed} line 3 ('a fox | a cow | an owl'): one '|' at most" in capsys.readouterr().err
    assert not os.path.exists(bad)
    listed.write_text("a cat\n")
    assert main(_cli(pipe_dir, str(listed), bad, "--fusion", "sum")) == 2
    assert "--fusion applies to --per-concept" in capsys.readouterr().err


def test_cli_processes_flag_runs_torchrun_and_matches_one_process(pipe_dir, tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text("a cat\na fox | a cow\n")
    one, two = str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")
    args = ["--per-concept", "--fusion", "least_squares"]
    assert main(_cli(pipe_dir, str(listed), one, *args)) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "spare_core.cli",
                          *_cli(pipe_dir, str(listed), two, *args, "--processes", "2")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    a, _ = read_safetensors(one)
    b, _ = read_safetensors(two)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def _node_run(tmp_path, monkeypatch, **settings):
    """The test double's host, the pack's nodes, and SelfDistillUnlearn's inputs for two-step
    runs on a tiny checkpoint with a rank-1 LoRA on every module (plus ``settings``)."""
    from comfy_double import Host, load_pack

    host = Host(str(tmp_path)).install(monkeypatch)
    nodes = load_pack().NODE_CLASS_MAPPINGS
    model, clip = host.load_checkpoint(seed=0)
    (init,) = host.run(nodes["SparseLoRAInit"], model=model, saliency=None,
                       module_selection="all", module_fraction=1.0, rank=1, alpha=1.0,
                       mask_fraction=1.0, seed=0)
    return host, nodes, dict(model=model, clip=clip, adapter=init, surrogate="a green line",
                             steps=2, lr=1e-2, timestep_sampler="uniform",
                             objective="self_distill", seed=0, batch_size=2, pool_steps=2,
                             cfg=3.0, width=64, height=64, **settings)


def test_node_per_concept_sum_is_the_sum_of_single_concept_runs(tmp_path, monkeypatch):
    """SelfDistillUnlearn with two concepts and per_concept 'sum' samples each prompt's pool
    once for the list (the concepts', the preserved prompt's, the empty prompt's), and equals
    the sum of two single-concept runs of the node on the same pools, each preserving the other
    concept."""
    import spare_core.tasks as tasks
    from comfy_double import load_pack

    host, nodes, common = _node_run(tmp_path, monkeypatch, pool_size=1)
    unlearn_node = sys.modules[f"{load_pack().__name__}.nodes.unlearn_node"]
    made, real = {}, unlearn_node.list_pools

    def recorded(den, prompts, *a, **k):
        out = real(den, prompts, *a, **k)
        made.update(out)
        return {p: out[p] for p in prompts}

    calls, real_sample = [], tasks.sample
    monkeypatch.setattr(unlearn_node, "list_pools", recorded)
    monkeypatch.setattr(tasks, "sample",  # every pool, the list's or a job's, is sampled here
                        lambda d, prompts, **k: calls.append(prompts[0]) or real_sample(d, prompts, **k))
    (fused, _loss) = host.run(nodes["SelfDistillUnlearn"], concept="a red circle\na blue square",
                        preserve="a purple star", per_concept="sum", **common)
    assert sorted(made) == sorted(calls) == sorted(["a red circle", "a blue square",
                                                    "a purple star", ""])
    monkeypatch.setattr(tasks, "sample", lambda d, prompts, **k: made[prompts[0]])  # the same pools
    singles = [host.run(nodes["SelfDistillUnlearn"], concept=c, preserve=f"a purple star\n{o}",
                        **common)[0]
               for c, o in (("a red circle", "a blue square"), ("a blue square", "a red circle"))]
    want = fuse_sum(singles).merged()
    chart = sys.modules[f"{load_pack().__name__}.nodes.chart"]
    seps = ((_loss[0] * 255).round().to(torch.int16) == torch.tensor(chart.SEPARATOR)).all(-1)
    assert int(seps.any(0).sum()) >= 1  # one loss panel per concept
    got = fused.merged()
    assert fused.meta["per_concept"] == "sum" and set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n])


def test_node_per_concept_least_squares_solves_on_linear_layers_and_sums_convs(tmp_path,
                                                                             monkeypatch):
    """per_concept 'least_squares' in the node: from the same two per-concept adapters as the
    sum, the Linear layers get MACE's closed form on the concepts' and the preserved prompt's
    layer inputs (not the sum), the Conv2d layers their sum; the file records the fusion."""
    host, nodes, common = _node_run(tmp_path, monkeypatch, pool_size=2,
                                    concept="a red circle\na blue square",
                                    preserve="a purple star")
    assert "least_squares" in nodes["SelfDistillUnlearn"].INPUT_TYPES()["optional"][
        "per_concept"][0]
    (summed, _) = host.run(nodes["SelfDistillUnlearn"], per_concept="sum", **common)
    (solved, _) = host.run(nodes["SelfDistillUnlearn"], per_concept="least_squares", **common)
    assert solved.meta["per_concept"] == "least_squares" == solved.meta["fusion"]
    a, b = summed.merged(), solved.merged()
    assert set(a) == set(b)
    linear = [n for n in a if a[n].dim() == 2]
    convs = [n for n in a if a[n].dim() == 4]
    assert linear and convs
    for n in convs:  # the closed form covers Linear layers; convolutions are summed
        torch.testing.assert_close(b[n], a[n])
    moved = [float((b[n] - a[n]).norm() / a[n].norm().clamp_min(1e-12)) for n in linear]
    assert max(moved) > 0.05  # the solve changed the Linear deltas
    assert all(torch.isfinite(b[n]).all() for n in b)
