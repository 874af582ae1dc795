"""filter_shard's Beam graph never gathers per-sample data into one element.

Read from the pipeline graph (no run): a global combine may only hold a bounded
accumulator (the score histograms), and the only side inputs are singletons of those
combines and the kept count per input tar. A uid list is read in pieces and joined by
bucket: no DoFn carries it.
"""
import apache_beam as beam
import numpy as np
from apache_beam.pipeline import PipelineVisitor

from components.filter_shard.beam_graph import build_beam_graph
from components.filter_shard.samples import FilterConfig


class _Gatherers(PipelineVisitor):
    """Collects the transforms that could put a whole PCollection into one element."""

    def __init__(self):
        self.found, self.side_inputs = [], []

    def _check(self, node):
        t = node.transform
        if isinstance(t, beam.CombineGlobally) and not getattr(t.fn, "bounded_accumulator", 0):
            self.found.append(node.full_label)
        if isinstance(t, (beam.combiners.ToList, beam.combiners.ToDict, beam.combiners.ToSet)):
            self.found.append(node.full_label)
        for side in node.side_inputs or ():
            self.side_inputs.append((type(side).__name__, side.pvalue.producer.full_label))

    def enter_composite_transform(self, node):
        self._check(node)

    def visit_transform(self, node):
        self._check(node)


def _inspect(cfg: FilterConfig, extra=None) -> _Gatherers:
    p = beam.Pipeline(runner="FnApiRunner")
    written = build_beam_graph(p, [f"/in/{i:05d}.tar" for i in range(4)], "/out", cfg)
    if extra:
        extra(written)
    visitor = _Gatherers()
    p.visit(visitor)
    return visitor


def _allowed(kind: str, producer: str) -> bool:
    if kind == "AsDict":  # one number per input tar
        return producer.startswith("KeptPerTar")
    if kind == "AsList":  # inside a bounded global combine: its one result, for the default
        return producer.startswith(("SumKept/", "SumHistogram"))
    return kind == "AsSingleton" and ("Pick" in producer or "Narrow" in producer
                                       or "SumHistogram" in producer)


def test_no_transform_gathers_per_sample_elements():
    for cfg in (FilterConfig(), FilterConfig(clip_model="m", clip_top_fraction=0.3,
                                             clip_min_score=0.1)):
        found = _inspect(cfg)
        assert found.found == []
        assert found.side_inputs, "the plan reads the per-tar counts as a side input"
        assert [s for s in found.side_inputs if not _allowed(*s)] == []
    top = _inspect(FilterConfig(clip_model="m", clip_top_fraction=0.3))
    # each of the 4 histogram passes reads the pick and narrows it; the cut reads the last
    assert sum(kind == "AsSingleton" for kind, _ in top.side_inputs) == 9


def test_the_check_catches_a_gathering_step():
    """The graph of the previous filter_shard (all SampleInfo to one worker) is caught."""
    found = _inspect(FilterConfig(), lambda pc: pc | "AllInfo" >> beam.combiners.ToList())
    assert found.found and found.found[0].startswith("AllInfo")
    found = _inspect(FilterConfig(), lambda pc: pc | "Total" >> beam.CombineGlobally(sum))
    assert found.found == ["Total"]


def _uid_parquet(path, n_uids: int, row_group_size: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(7)
    uids = [rng.bytes(16).hex() for _ in range(n_uids)]
    pq.write_table(pa.table({"uid": uids}), path, row_group_size=row_group_size)
    return uids


def test_the_uid_list_is_joined_by_bucket_not_held_by_a_worker(tmp_path):
    """With a uid list, no DoFn holds the list: it is read in pieces (one per row group)
    and joined per uid bucket; the check step only checks that a uid is well-formed."""
    import cloudpickle  # as Beam ships a DoFn, but uncompressed: a uid's bytes show

    from components.filter_shard.beam_graph import CheckShard, KeepListed
    from components.filter_shard.matching import UID_DTYPE, UidList, uid_pair

    path = str(tmp_path / "uids.parquet")
    uids = _uid_parquet(path, 300, row_group_size=100)
    cfg = FilterConfig(uid_list=path)
    found = _inspect(cfg)
    assert found.found == [] and [s for s in found.side_inputs if not _allowed(*s)] == []

    nodes = {}

    class _Nodes(PipelineVisitor):
        def enter_composite_transform(self, node):
            nodes[node.full_label] = node.transform

        def visit_transform(self, node):
            nodes[node.full_label] = node.transform

    p = beam.Pipeline(runner="FnApiRunner")
    build_beam_graph(p, [f"/in/{i:05d}.tar" for i in range(4)], "/out", cfg)
    p.visit(_Nodes())
    pieces = nodes["UidPieces"].values
    assert len(pieces) == 3 and sorted(pc.start for pc in pieces) == [0, 1, 2]
    assert isinstance(nodes["ByUid"], beam.CoGroupByKey)
    assert isinstance(nodes["KeepListed"].fn, KeepListed)
    # what every worker is shipped: no DoFn carries a uid of the list
    # (the uid as a worker would hold it: a u8,u8 array's bytes, or its hex text)
    samples = [np.array([uid_pair(u)], UID_DTYPE).tobytes() for u in uids[::50]]
    samples += [u.encode() for u in uids[::50]]
    for label, t in nodes.items():
        if isinstance(t, beam.ParDo):
            shipped = cloudpickle.dumps(t.fn)
            assert not any(s in shipped for s in samples), label
            assert not any(isinstance(v, UidList) for v in vars(t.fn).values()), label
    check = nodes["CheckShard"].fn
    assert isinstance(check, CheckShard)
    check.setup()  # what a worker holds once started: still no list
    assert not any(isinstance(v, UidList) for v in vars(check).values())
