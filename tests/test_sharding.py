import hashlib

import datasets
import pyarrow.parquet as pq

from pipeline.publishing.sharding import RowSpill, plan_shards, write_shards

FEATURES = datasets.Features({"id": datasets.Value("string"), "blob": datasets.Value("binary")})


def _ids(n):
    return [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(n)]


def test_plan_shards_cuts_sorted_ids_at_the_byte_budget():
    sizes = [("c", 40), ("a", 40), ("b", 40), ("d", 100), ("e", 10)]
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_shards(sizes, 10_000) == [["a", "b", "c", "d", "e"]]
    assert plan_shards([], 100) == []


def test_stream_becomes_sorted_shards_per_split(tmp_path):
    ids = _ids(300)  # fed in hash order, not sorted
    split = {i: "test" if int(i[-1], 16) < 4 else "train" for i in ids}
    spill = RowSpill(tmp_path / "rows", FEATURES)
    for i in ids:
        spill.add({"id": i, "blob": i.encode() * 10})
    assert spill.read([ids[5], ids[2]]).column("id").to_pylist() == [ids[5], ids[2]]
    plans = {s: plan_shards([(i, 320) for i in ids if split[i] == s], 10_000) for s in ("train", "test")}
    (tmp_path / "out").mkdir()
    seen = []
    files = write_shards(spill, plans, tmp_path / "out", row_group_rows=16, progress=seen.append)
    assert sum(seen) == len(ids)
    for s in ("train", "test"):
        names = [f for f in files if f.name.startswith(s + "-")]
        assert len(names) == len(plans[s]) > 1
        assert all(f.name.endswith(f"-of-{len(names):05d}.parquet") and f.exists() for f in names)
        got = [i for f in names for i in pq.read_table(f).column("id").to_pylist()]
        assert got == sorted(i for i in ids if split[i] == s)
        assert pq.ParquetFile(names[0]).metadata.row_group(0).num_rows == 16
        first = pq.read_table(names[0]).slice(0, 1).to_pylist()[0]
        assert first["blob"] == first["id"].encode() * 10
