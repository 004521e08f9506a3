"""benchmarks/sweep.py's job dealing: every job on exactly one shard, each shard its share of
the long training runs, also for a sweep of one target and one seed."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep():
    spec = importlib.util.spec_from_file_location("sweep", os.path.join(REPO, "benchmarks", "sweep.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_jobs_are_dealt_to_every_shard_once_and_evenly():
    sweep = _sweep()
    for methods, targets, seeds in ((["a", "b", "c", "d"], ["neon"], [0]),
                                    (["a", "b"], ["neon", "plus", "heart"], [0, 1])):
        every = [("original", t, s) for s in seeds for t in targets]
        every += [(m, t, s) for m in methods for s in seeds for t in targets]
        shards = [sweep.jobs(methods, targets, seeds, k, 2) for k in range(2)]
        assert sorted(shards[0] + shards[1]) == sorted(every)
        trained = [sum(j[0] != "original" for j in sh) for sh in shards]
        assert abs(trained[0] - trained[1]) <= 1, trained  # one target, one seed: 2 and 2
