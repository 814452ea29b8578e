"""Remote faults against real nginx, moto and SeaweedFS behind tests/faultproxy.py.

- A response is used only when its header block is complete and consistent with the
  request: cuts inside the header block (which Python's http.client accepts as a short
  block), missing or truncated Content-Length/Content-Range/ETag, and short bodies are
  retried from the current byte, for HTTP, S3 and the cache's downloads.
- A sidecar (manifest, .idx) that exists but cannot be read is an error naming its URL;
  only "not found" means absent. A saved state is refused under another plan.
- ``Retry-After`` is honoured up to ``max_backoff``.
- A bounded soak: random faults, loaders killed mid-epoch and resumed, every sample
  delivered once with the source's bytes (``tools/soak.py`` runs the long version).
"""

from __future__ import annotations

import email.utils
import os
import time

import pytest

from shardkit.errors import ShardkitError, SourceError
from shardkit.loader import ShardLoader
from shardkit.plan.state import PlanIdentity
from shardkit.read.dataset import ShardDataset
from shardkit.storage.dispatch import SourceOptions, open_stream, read_bytes
from tests.faultproxy import Fault, FaultProxy
from tests.servers import BUCKET, run_nginx
from tests.soak import Summary, draw_spec, make_soak_data, soak_run

pytestmark = pytest.mark.timeout(120)

FAST = SourceOptions(retries=4, backoff=0.001, timeout=5)
SHARD = "m/data-000001.tar"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("faults"))
    data = make_soak_data(root)
    with run_nginx(root) as nginx:
        yield data, nginx


def file_bytes(data, name: str) -> bytes:
    with open(os.path.join(data.root, name), "rb") as f:
        return f.read()


def read(url: str, offset: int = 0, length: int | None = None, options: SourceOptions = FAST) -> bytes:
    with open_stream(url, offset=offset, length=length, options=options) as f:
        return f.read()


# -- the four defects of issue 26, each on its own -------------------------------------


def test_whole_get_cut_before_content_length_is_retried(served):
    """Before: http.client took the cut block as complete, no length: 0 bytes, no error."""
    data, nginx = served
    with FaultProxy(nginx.port) as proxy:
        proxy.script([Fault("cut_head", before="Content-Length")])
        got = read(proxy.url(SHARD))
        assert proxy.injected["cut_head"] == 1 and proxy.requests == 2
    want = file_bytes(data, SHARD)
    assert len(got) == len(want) and got == want


def test_ranged_get_cut_before_content_range_is_retried(served):
    """Before: failed for good with "server answered Content-Range None"."""
    data, nginx = served
    with FaultProxy(nginx.port) as proxy:
        proxy.script([Fault("cut_head", before="Content-Range")])
        got = read(proxy.url(SHARD), offset=1000)
        assert proxy.injected["cut_head"] == 1
    want = file_bytes(data, SHARD)[1000:]
    assert len(got) == len(want) and got == want


@pytest.mark.parametrize("header,keep", [("Content-Length", 2), ("ETag", 3), ("Content-Range", 9)])
def test_a_cut_inside_a_value_is_not_recorded(served, header, keep):
    """Before: the cut value was taken as the object's size/ETag and the next, correct
    answer refused as "object size changed" / "object changed"."""
    data, nginx = served
    offset = 500 if header == "Content-Range" else 0
    with FaultProxy(nginx.port) as proxy:
        proxy.script([Fault("cut_head", inside=header, keep=keep)])
        got = read(proxy.url(SHARD), offset=offset)
        assert proxy.injected["cut_head"] == 1
    want = file_bytes(data, SHARD)[offset:]
    assert len(got) == len(want) and got == want


def test_content_range_first_cut_before_the_current_position(served):
    """Before: with Content-Range ahead of Content-Length, ``bytes 1000-1`` (cut) was
    taken as a body ending before byte 1000: the stream returned 0 of N bytes."""
    data, nginx = served
    fault = Fault("cut_head", inside="Content-Range", keep=len("bytes 1000-1"), first=("Content-Range",))
    with FaultProxy(nginx.port) as proxy:
        proxy.script([fault])
        got = read(proxy.url(SHARD), offset=1000)
        assert proxy.injected["cut_head"] == 1
    want = file_bytes(data, SHARD)[1000:]
    assert len(got) == len(want) and got == want


@pytest.mark.parametrize("offset,length", [(0, None), (777, None), (777, 5000)])
@pytest.mark.parametrize("first", [(), ("Content-Range",)])
def test_a_cut_at_every_byte_of_the_header_block(served, offset, length, first):
    """Requests cut (clean close) after 0, 1, 2, ... bytes of their header block, as many
    in a row as the retry budget allows, then one that goes through."""
    data, nginx = served
    want = file_bytes(data, SHARD)[offset : None if length is None else offset + length]
    head_size = 320  # nginx's header block is shorter: past its end a cut is at its last byte
    with FaultProxy(nginx.port) as proxy:
        for k in range(0, head_size, FAST.retries):
            proxy.script([Fault("cut_head", offset=k + i, first=first) for i in range(FAST.retries)])
            got = read(proxy.url(SHARD), offset=offset, length=length)
            assert len(got) == len(want) and got == want, k
            assert proxy.pending() == 0
        assert proxy.injected["cut_head"] == head_size


def test_short_bodies_are_resumed_never_returned(served):
    data, nginx = served
    want = file_bytes(data, SHARD)
    with FaultProxy(nginx.port) as proxy:
        proxy.script([Fault("cut_body", at=k / 10, rst=k % 2 == 1) for k in range(10)])
        for _ in range(3):
            got = read(proxy.url(SHARD))
            assert len(got) == len(want) and got == want
        assert proxy.injected["cut_body"] + proxy.injected["cut_body_rst"] == 10


@pytest.mark.parametrize("in_head", [True, False])
def test_stalls_time_out_and_resume(served, in_head):
    data, nginx = served
    want = file_bytes(data, SHARD)
    opts = SourceOptions(retries=3, backoff=0.001, timeout=0.3)
    with FaultProxy(nginx.port) as proxy:
        proxy.script([Fault("stall", at=0.5, seconds=2.0, in_head=in_head)])
        start = time.monotonic()
        got = read(proxy.url(SHARD), offset=10, options=opts)
        assert proxy.injected["stall"] == 1 and time.monotonic() - start < 1.9
    assert len(got) == len(want) - 10 and got == want[10:]


def test_sidecar_read_cut_in_its_headers(served):
    """Before: an .idx read the same way came back empty ("bad magic")."""
    data, nginx = served
    with FaultProxy(nginx.port) as proxy:
        proxy.script([Fault("cut_head", before="Content-Length")], path=".idx")
        proxy.script([Fault("cut_head", before="Content-Length")], path=".json")
        assert read_bytes(proxy.url(SHARD + ".idx"), options=FAST) == file_bytes(data, SHARD + ".idx")
        assert read_bytes(proxy.url("m/data.manifest.json"), options=FAST) == file_bytes(data, "m/data.manifest.json")
        assert proxy.pending() == 0


def test_cache_download_cut_in_its_headers(served, tmp_path):
    """Before: the cache stored an empty shard (caught only by a manifest's sha256)."""
    data, nginx = served
    opts = SourceOptions(retries=4, backoff=0.001, timeout=5, cache_dir=str(tmp_path))
    want = file_bytes(data, SHARD)
    with FaultProxy(nginx.port) as proxy:
        proxy.script([Fault("cut_head", before="Content-Length"), Fault("cut_body", at=0.5)])
        got = read(proxy.url(SHARD), offset=100, length=200, options=opts)
        assert got == want[100:300]
        assert proxy.pending() == 0
    objects = os.listdir(tmp_path / "objects")
    assert len(objects) == 1 and os.path.getsize(tmp_path / "objects" / objects[0]) == len(want)


def test_give_up_names_the_url(served):
    data, nginx = served
    with FaultProxy(nginx.port) as proxy:
        proxy.script([Fault("cut_head", before="Content-Length")] * 10)
        url = proxy.url(SHARD)
        with pytest.raises(SourceError) as err:
            read(url, options=SourceOptions(retries=2, backoff=0.001))
    assert err.value.url == url and url in str(err.value) and "after 2 retries" in str(err.value)


# -- Retry-After ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(served, status):
    data, nginx = served
    opts = SourceOptions(retries=3, backoff=0.001, max_backoff=5)
    with FaultProxy(nginx.port) as proxy:
        proxy.outage(SHARD, 1, status=status, retry_after="1")
        start = time.monotonic()
        assert read(proxy.url(SHARD), options=opts) == file_bytes(data, SHARD)
        assert 0.95 <= time.monotonic() - start < 5


def test_retry_after_as_a_date_is_honoured(served):
    data, nginx = served
    opts = SourceOptions(retries=3, backoff=0.001, max_backoff=5)
    with FaultProxy(nginx.port) as proxy:
        proxy.outage(SHARD, 1, retry_after=email.utils.formatdate(time.time() + 2, usegmt=True))
        start = time.monotonic()
        assert read(proxy.url(SHARD), options=opts) == file_bytes(data, SHARD)
        assert 0.95 <= time.monotonic() - start < 5


def test_retry_after_is_bounded_by_max_backoff(served):
    data, nginx = served
    opts = SourceOptions(retries=3, backoff=0.001, max_backoff=0.2)
    with FaultProxy(nginx.port) as proxy:
        proxy.outage(SHARD, 2, retry_after="3600")
        start = time.monotonic()
        assert read(proxy.url(SHARD), options=opts) == file_bytes(data, SHARD)
        assert 0.35 <= time.monotonic() - start < 2


def test_bad_retry_options_are_refused():
    for bad in ({"retries": -1}, {"backoff": -1.0}, {"max_backoff": -1.0}, {"timeout": 0}):
        with pytest.raises(ValueError):
            SourceOptions(**bad)


# -- sidecars: unreadable is an error, only "not found" is absent --------------------------


@pytest.mark.parametrize("source", ["manifest", "pattern"])
def test_manifest_unreachable_is_an_error_naming_it(served, source):
    """Before: after the retries the dataset silently split by whole shards."""
    data, nginx = served
    with FaultProxy(nginx.port) as proxy:
        proxy.outage("data.manifest.json", 100)
        with pytest.raises(SourceError) as err:
            ShardDataset(data.url(proxy.url(""), source), source_options=FAST)
        manifest = proxy.url("m/data.manifest.json")
    assert err.value.url == manifest and "HTTP 503" in str(err.value)


def test_manifest_not_found_means_absent(served):
    data, nginx = served
    with FaultProxy(nginx.port) as proxy:
        ds = ShardDataset(data.url(proxy.url(""), "plain"), source_options=FAST)
    assert ds.counts is None and len(ds.urls) == data.shards


def test_manifest_forbidden_is_absent_with_a_warning(nginx_server, caplog):
    """S3 (and CloudFront) answer 403 for a missing key to readers without list
    permission: a 403 on the manifest looked for beside the shards is absent, said aloud."""
    url = nginx_server.url + "forbidden/x.tar"
    ds = ShardDataset(url, source_options=FAST)
    assert ds.counts is None and ds.urls == [url]
    assert any("forbidden/x.tar.manifest.json" in r.getMessage() and "403" in r.getMessage() for r in caplog.records)


def test_unreadable_manifest_beside_the_shards_is_an_error(served, tmp_path):
    data, _ = served
    folder = tmp_path / "ds"
    os.makedirs(folder)
    for i in range(data.shards):
        name = f"data-{i:06d}.tar"
        os.symlink(os.path.join(data.root, "p", name), folder / name)
    (folder / "data.manifest.json").write_text('{"format": "shardkit", "shards": [')
    with pytest.raises(ShardkitError, match="data.manifest.json"):
        ShardDataset(str(folder / f"data-{{000000..{data.shards - 1:06d}}}.tar"))


def test_unreadable_local_idx_is_an_error(served, tmp_path):
    data, _ = served
    folder = tmp_path / "ds"
    os.makedirs(folder)
    for i in range(data.shards):
        name = f"data-{i:06d}.tar"
        os.symlink(os.path.join(data.root, "m", name), folder / name)
        os.symlink(os.path.join(data.root, "m", name + ".idx"), folder / (name + ".idx"))
    os.remove(folder / "data-000003.tar.idx")
    os.makedirs(folder / "data-000003.tar.idx")  # exists, cannot be read
    with pytest.raises(SourceError) as err:
        ShardDataset(str(folder / f"data-{{000000..{data.shards - 1:06d}}}.tar"))
    assert err.value.url == str(folder / "data-000003.tar.idx")


def test_idx_unreachable_while_reading_is_an_error_naming_it(served):
    """Planned reads seek with the .idx: a failing one is an error, not a full-shard scan."""
    data, nginx = served
    with FaultProxy(nginx.port) as proxy:
        ds = ShardDataset(data.url(proxy.url(""), "manifest"), source_options=FAST)
        proxy.outage("data-000001.tar.idx", 100)
        with pytest.raises(SourceError) as err:
            list(ds)
        idx = proxy.url("m/data-000001.tar.idx")
    assert err.value.url == idx


# -- the plan a state belongs to ----------------------------------------------------------


def _state_after(ds: ShardDataset, batches: int, **kw) -> dict:
    loader = ShardLoader(ds, batch_size=2, num_workers=0, **kw)
    it = iter(loader)
    for _ in range(batches):
        next(it)
    return loader.state_dict()


def test_state_under_another_plan_is_refused(served):
    """Before: a state saved under the sample-level plan was applied to whole-shard
    splitting (the manifest was unreachable at resume): 49 lost, 49 duplicated."""
    data, _ = served
    by_sample = ShardDataset(data.url(data.root + "/", "pattern"), seed=3)
    assert by_sample.counts is not None
    state = _state_after(by_sample, 3)
    by_shard = ShardDataset(data.url(data.root + "/", "plain"), seed=3)
    assert by_shard.counts is None
    with pytest.raises(ShardkitError) as err:
        ShardLoader(by_shard, batch_size=2, num_workers=0).load_state_dict(state)
    message = str(err.value)
    assert "by sample" in message and "by whole shard" in message
    worker_state = by_sample.state_dict()
    with pytest.raises(ShardkitError, match="by sample"):
        by_shard.load_state_dict(worker_state)


def test_state_with_other_counts_is_refused(served, tmp_path):
    data, _ = served
    state = _state_after(ShardDataset(data.url(data.root + "/", "manifest")), 2)
    other = make_soak_data(str(tmp_path), seed=1)  # same names, other sample counts
    ds = ShardDataset(other.url(other.root + "/", "manifest"))
    with pytest.raises(ShardkitError, match="sample counts changed"):
        ShardLoader(ds, batch_size=2, num_workers=0).load_state_dict(state)


def test_plan_identity_says_what_changed():
    base = PlanIdentity.of([3, 0, 5], shards=3, shuffle_shards=True)
    assert base.changes(PlanIdentity.of([3, 0, 5], shards=3, shuffle_shards=True)) == []
    assert base.changes(PlanIdentity.from_dict(base.to_dict())) == []
    [by] = base.changes(PlanIdentity.of(None, shards=3, shuffle_shards=True))
    assert "by sample over 3 shard(s), 8 sample(s)" in by and "by whole shard" in by
    [counts] = base.changes(PlanIdentity.of([3, 1, 5], shards=3, shuffle_shards=True))
    assert "sample counts changed (8 -> 9" in counts
    [shards] = base.changes(PlanIdentity.of([3, 0, 5, 1], shards=4, shuffle_shards=True))
    assert "number of shards changed (3 -> 4)" in shards
    [option] = base.changes(PlanIdentity.of([3, 0, 5], shards=3, shuffle_shards=False))
    assert option == "shuffle_shards changed (True -> False)"
    mix = PlanIdentity.of_parts([base, PlanIdentity.of([2], shards=1)], weights=[1.0, 2.0])
    assert (mix.by, mix.shards, mix.samples) == ("sample", 4, 10)
    assert mix.changes(PlanIdentity.of_parts([base, PlanIdentity.of([3], shards=1)], weights=[1.0, 2.0]))


def test_state_under_the_same_plan_and_another_topology_is_accepted(served):
    data, _ = served
    url = data.url(data.root + "/", "manifest")
    state = _state_after(ShardDataset(url), 2)
    assert state["plan"]["by"] == "sample"
    loader = ShardLoader(ShardDataset(url), batch_size=2, num_workers=1)
    loader.load_state_dict(state)  # elastic: another worker count re-plans exactly
    keys = [k for b in loader for k in b["__key__"]]
    assert len(keys) == len(set(keys)) == len(data.expected) - 4
    legacy = {k: v for k, v in state.items() if k != "plan"}  # saved before plans were recorded
    ShardLoader(ShardDataset(url), batch_size=2, num_workers=0).load_state_dict(legacy)


# -- S3: the same header and body checks ----------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "fault,offset",
    [
        (Fault("cut_head", before="Content-Length"), 0),
        (Fault("cut_head", inside="Content-Length", keep=2), 0),
        (Fault("cut_head", inside="ETag", keep=4), 0),
        (Fault("cut_head", before="Content-Range"), 1000),
        (Fault("cut_head", inside="Content-Range", keep=len("bytes 1000-1"), first=("Content-Range",)), 1000),
        (Fault("cut_body", at=0.3), 1000),
        (Fault("status", status=503, retry_after="0"), 0),
    ],
    ids=["before-length", "inside-length", "inside-etag", "before-range", "range-first", "short-body", "503"],
)
def test_s3_header_and_body_checks(s3_server, shard_files, monkeypatch, fault, offset):
    name = shard_files.names[0]
    want = shard_files.data(name)[offset:]
    with FaultProxy(s3_server.port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        proxy.script([fault, fault], path=name)
        got = read(f"s3://{BUCKET}/{name}", offset=offset)
        assert proxy.pending() == 0
    assert len(got) == len(want) and got == want


@pytest.mark.timeout(60)
def test_s3_retry_after_is_honoured(s3_server, shard_files, monkeypatch):
    name = shard_files.names[0]
    opts = SourceOptions(retries=3, backoff=0.001, max_backoff=5)
    with FaultProxy(s3_server.port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        proxy.outage(name, 1, retry_after="1")
        start = time.monotonic()
        assert read(f"s3://{BUCKET}/{name}", options=opts) == shard_files.data(name)
        assert 0.95 <= time.monotonic() - start < 5


# -- the soak --------------------------------------------------------------------------------

SOAK_SEEDS = range(36)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_soak_kill_resume_exact(served, tmp_path):
    data, nginx = served
    summary = Summary()
    failures, sources = [], set()
    for seed in SOAK_SEEDS:
        result = soak_run(draw_spec(seed), data, nginx.port, str(tmp_path), deadline=60)
        summary.add(result)
        sources.add(result.spec.source)
        if not result.ok:
            failures.append(result)
    assert not failures, failures
    assert summary.lost == summary.duplicated == summary.corrupted == summary.hangs == 0
    assert summary.complete == summary.runs == len(SOAK_SEEDS) and not summary.quiet
    # The soak really exercised what it claims: faults of every kind, kills, give-ups.
    assert sum(summary.faults.values()) >= 100, summary.faults
    assert {k.split("_")[0] for k in summary.faults} >= {"cut", "stall", "status", "reset"}
    assert summary.kills >= 5 and summary.give_ups >= 1 and len(sources) == 4, summary
