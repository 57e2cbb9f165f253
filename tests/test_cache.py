import multiprocessing as mp

from pipeline.synthesis.cache import RequestCache, request_key


def test_key_changes_with_every_component():
    base = {"backend": "openai", "model": "m", "stage": "reason", "template_sha256": "a" * 64,
            "sampling": {"temperature": 0.7}, "sample_id": "s1", "rollout": 0}
    keys = {request_key(**base)}
    for field, value in [("backend", "vllm"), ("model", "m2"), ("stage", "anchor"),
                         ("template_sha256", "b" * 64), ("sampling", {"temperature": 0.8}),
                         ("sample_id", "s2"), ("rollout", 1)]:
        keys.add(request_key(**dict(base, **{field: value})))
    assert len(keys) == 8
    assert request_key(**base) == request_key(**dict(base, sampling={"temperature": 0.7}))


def _writer(path, start):
    cache = RequestCache(path)
    for i in range(start, start + 50):
        cache.put(f"k{i}", {"text": str(i)})


def test_persists_across_instances_and_processes(tmp_path):
    path = tmp_path / "cache.sqlite"
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, s)) for s in (0, 50)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    cache = RequestCache(path)
    assert len(cache) == 100
    assert cache.get("k73") == {"text": "73"} and cache.get("missing") is None
    assert set(cache.get_many([f"k{i}" for i in range(95, 105)])) == {f"k{i}" for i in range(95, 100)}
