"""Sparse communication: top-k uploads and downloads through the real client and coordinator."""

from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from test_run import tiny_plan
from typer.testing import CliRunner

from fedpipe import wire
from fedpipe.cli import app
from fedpipe.client import AdaptedModel, EdgeTrainer
from fedpipe.data import plan_data
from fedpipe.errors import FedpipeError
from fedpipe.federation.coordinator import Coordinator, align_components
from fedpipe.federation.inprocess import run_plan
from fedpipe.federation.loop import matrix_shapes
from fedpipe.federation.screen import Expected
from fedpipe.federation.spec import with_communication
from fedpipe.lora import LoraFactors
from fedpipe.models import (
    get_factors,
    load_base,
    load_tokenizer,
    make_tiny_llama,
    plan_model_dir,
    reset_lora,
    set_factors,
)
from fedpipe.plan import load_plan, save_plan
from fedpipe.planning.diff import diff_plans
from fedpipe.protocol import derived_seed, peek_metadata, read_update
from fedpipe.render import diff_table


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """The tiny model at hidden 256: factors large enough that the payload header (~60 bytes per
    module) does not hide the byte ratio, which at 1/4 tends to 0.28."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "wide-llama", hidden=256,
                           intermediate=512)


def wide_plan(tmp_path, model_dir, rule: str, rank: int = 32):
    plan = load_plan(tiny_plan(tmp_path, model_dir, rule=rule))
    servers = [s.model_copy(update={"rank_pattern": dict.fromkeys(s.rank_pattern, rank)})
               for s in plan.servers]
    return plan.model_copy(update={"servers": servers})


def federation(plan, rule):
    """The runner's setup, kept open so a test can look inside every round."""
    task = plan.task
    members, (shards, _) = plan.training_members(), plan_data(plan, task.eval_samples)
    model_dir = plan_model_dir(plan)
    tokenizer = load_tokenizer(model_dir)
    trainers = [EdgeTrainer(m, entry, shards[m], tokenizer, model_dir, task.seq_len,
                            task.learning_rate, task.seed) for m, entry in members]
    pool = {e.name: AdaptedModel.load(model_dir, e, "cpu", task.seed) for e in plan.servers}
    return trainers, pool, Coordinator(rule)


def expectation(trainer, round_index: int) -> Expected:
    """What the plan says `trainer`'s update of this round must be."""
    model = load_base(trainer.model_dir, 16)
    return Expected(trainer.name, trainer.entry.name, round_index, trainer.n_samples,
                    trainer.entry.rank_pattern, matrix_shapes(model, set(trainer.entry.rank_pattern)))


def assert_same(a: dict[str, LoraFactors], b: dict[str, LoraFactors], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for part in ("A", "B"):
            x, y = getattr(a[name], part), getattr(b[name], part)
            assert x.shape == y.shape and torch.allclose(x, y, atol=atol, rtol=0), (name, part)


def test_sparse_rounds_rebuild_what_was_sent(tmp_path, wide_model_dir):
    plan = with_communication(wide_plan(tmp_path, wide_model_dir, "fedit"), upload_density=0.25, download_density=0.25)
    trainers, pool, coordinator = federation(plan, "fedit")
    down_bytes = []
    for round_index in (1, 2, 3):
        ups = []
        for t in trainers:
            down = coordinator.broadcast(t.entry)
            up, _ = t.train_round(pool[t.entry.name], down, 2, rounds=3)
            ups.append(up)
            # the download: the server holds exactly what the coordinator thinks it holds
            assert t.held[0] == round_index
            assert_same(t.held[1], coordinator.sent[t.entry.name].init)
            # the start the server really trained from, read back from its model
            model = pool[t.entry.name].model
            trained = get_factors(model)
            reset_lora(model, derived_seed(t.seed, round_index, t.name))
            set_factors(model, t.held[1])
            start = get_factors(model)
            reference = coordinator.upload_reference(peek_metadata(up), expectation(t, round_index))
            assert_same(reference, start)  # rebuilt on the coordinator from the payload alone
            got = read_update(up, reference).factors
            expected = {}
            for name, f in trained.items():
                parts = {}
                for part in ("A", "B"):
                    s = getattr(start[name], part)
                    sparse, _ = wire.topk_with_residual(getattr(f, part) - s, None, 0.25)
                    parts[part] = s + sparse
                    assert (sparse != 0).sum() <= -(-sparse.numel() // 4)
                expected[name] = LoraFactors(parts["A"], parts["B"], f.scale)
            assert_same(got, expected, atol=1e-6)
            dense = wire.encode(trained, metadata={"server": t.name, "n_samples": "1"})
            assert len(up) <= 0.3 * len(dense), (t.name, len(up), len(dense))
        down_bytes.append({t.name: len(coordinator.broadcast(t.entry)) for t in trainers})
        coordinator.aggregate([coordinator.receive(up, expectation(t, round_index))
                               for up, t in zip(ups, trainers, strict=True)])
    # round 2 is the first global (dense: nothing held yet), round 3 a top-k against it
    for name, dense_down in down_bytes[1].items():
        assert down_bytes[2][name] <= 0.3 * dense_down, (name, down_bytes)

    # a trainer that did not hold round 3's broadcast (a Flower node starts fresh) refuses it
    t = trainers[0]
    fresh = EdgeTrainer(t.name, t.entry, [], load_tokenizer(plan_model_dir(plan)), plan_model_dir(plan),
                        plan.task.seq_len, plan.task.learning_rate, plan.task.seed)
    next_down = coordinator.broadcast(t.entry)
    with pytest.raises(FedpipeError, match="holds none"):
        fresh.receive(next_down)
    # and a coordinator that did not broadcast cannot rebuild a sparse upload's start
    with pytest.raises(FedpipeError, match=f"server {t.name}"):
        Coordinator("fedit").upload_reference(peek_metadata(ups[0]), expectation(t, 3))


def test_shared_fresh_start_makes_round_two_broadcast_a_delta(tmp_path, wide_model_dir):
    """fedit: every server starts round 1 from the same A, so round 2's lossy broadcast is a
    delta against it (its int2 error scales with the round's change, not with the factors)."""
    # Prepare: a fedit federation at int2 both ways, servers sharing the round's fresh A.
    plan = with_communication(wide_plan(tmp_path, wide_model_dir, "fedit", rank=8),
                              upload_precision="int2", download_precision="int2")
    task = plan.task
    members, (shards, _) = plan.training_members(), plan_data(plan, task.eval_samples)
    model_dir = plan_model_dir(plan)
    tokenizer = load_tokenizer(model_dir)
    trainers = [EdgeTrainer(m, entry, shards[m], tokenizer, model_dir, task.seq_len, task.learning_rate,
                            task.seed, shared_init=True) for m, entry in members]
    pool = {e.name: AdaptedModel.load(model_dir, e, "cpu", task.seed) for e in plan.servers}
    coordinator = Coordinator("fedit", seed=task.seed)
    # Execute: round 1, then round 2's broadcasts.
    ups = [t.train_round(pool[t.entry.name], coordinator.broadcast(t.entry), 2, rounds=2)[0] for t in trainers]
    starts = [t.held[1] for t in trainers]
    coordinator.aggregate([coordinator.receive(up, expectation(t, 1)) for up, t in zip(ups, trainers, strict=True)])
    exact = coordinator.aggregator.broadcast(coordinator.global_adapter, None, trainers[0].entry.rank_pattern,
                                             trainers[0].entry.scales()).adapter_init
    down = coordinator.broadcast(trainers[0].entry)
    received = trainers[0].receive(down)
    # Assert: one fresh start for all; round 2 names it as its reference and is decoded exactly as
    # the coordinator holds it; its error is a fraction of an absolute int2 broadcast's.
    shared = [n for n in starts[0] if all(n in s and s[n].A.shape == starts[0][n].A.shape for s in starts)]
    assert shared
    for start in starts[1:]:
        assert_same({n: start[n] for n in shared}, {n: starts[0][n] for n in shared})
    assert peek_metadata(down)["reference_round"] == "1"
    assert_same(received.init, coordinator.sent[trainers[0].entry.name].init)
    absolute, _ = wire.decode(wire.encode(exact, precision="int2"))

    def error(got):
        return sum(float((getattr(got[n], p) - getattr(exact[n], p)).pow(2).sum()) for n in exact for p in "AB")

    assert error(received.init) < 0.1 * error(absolute)


def test_align_components_keeps_products_and_undoes_relabelling():
    gen = torch.Generator().manual_seed(0)
    held = {"m": LoraFactors(torch.randn(4, 32, generator=gen), torch.randn(24, 4, generator=gen), 2.0)}
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen))
    h = held["m"]
    new = {"m": LoraFactors(q @ h.A + 0.01 * torch.randn(4, 32, generator=gen),
                            (h.B + 0.01 * torch.randn(24, 4, generator=gen)) @ q.T, 2.0)}
    aligned = align_components(new, held)["m"]
    assert torch.allclose(aligned.B @ aligned.A, new["m"].B @ new["m"].A, atol=1e-4)
    assert (aligned.A - h.A).norm() < 0.1 * (new["m"].A - h.A).norm()
    assert (aligned.B - h.B).norm() < 0.1 * (new["m"].B - h.B).norm()


def test_flora_run_with_sparse_uploads(tmp_path, tiny_model_dir):
    """flora starts every module fresh every round: the coordinator rebuilds each start from the
    seed the server names."""
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="flora", rounds=2)
    result = run_plan(plan_path, out=tmp_path / "run", upload_density=0.25)
    for row in result.rows:
        assert torch.isfinite(torch.tensor(row["eval"]["loss"]))
        for s in row["servers"]:
            assert s["upload_density"] == 0.25 and s["download_density"] == 1.0


def test_density_out_of_range_names_server_and_field(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="fedit")
    raw = yaml.safe_load(plan_path.read_text())
    for field, value in (("upload_density", 0.0), ("download_density", 1.5)):
        broken = yaml.safe_load(plan_path.read_text())
        broken["servers"][0][field] = value
        path = tmp_path / f"{field}.plan.yaml"
        path.write_text(yaml.safe_dump(broken))
        with pytest.raises(FedpipeError) as e:
            load_plan(path)
        assert field in str(e.value) and repr(raw["servers"][0]["name"]) in str(e.value)
    with pytest.raises(FedpipeError, match="upload_density"):
        with_communication(load_plan(plan_path), upload_density=-0.5)
    result = CliRunner().invoke(app, ["run", str(plan_path), "--download-density", "2",
                                      "--out", str(tmp_path / "never")])
    assert result.exit_code == 2 and "download_density" in result.output


def test_flora_refuses_sparse_downloads(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="flora")
    raw = yaml.safe_load(plan_path.read_text())
    raw["servers"][1]["download_density"] = 0.25
    (tmp_path / "bad.plan.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(FedpipeError) as e:
        load_plan(tmp_path / "bad.plan.yaml")
    for word in ("download_density", "flora", repr(raw["servers"][1]["name"])):
        assert word in str(e.value)
    fedit = tiny_plan(tmp_path, tiny_model_dir, rule="fedit")  # checked again with the run's rule
    with pytest.raises(FedpipeError, match="download_density 0.25 with aggregation 'flora'"):
        run_plan(fedit, out=tmp_path / "never", aggregation="flora", download_density=0.25)
    assert not (tmp_path / "never").exists()


def test_old_plans_load_dense_and_diff_shows_density(tmp_path, tiny_model_dir):
    plan_path = tiny_plan(tmp_path, tiny_model_dir, rule="fedit")
    raw = yaml.safe_load(plan_path.read_text())
    for s in raw["servers"]:
        s.pop("upload_density"), s.pop("download_density")
    (tmp_path / "old.plan.yaml").write_text(yaml.safe_dump(raw))
    old = load_plan(tmp_path / "old.plan.yaml")
    assert all(s.upload_density == 1.0 and s.download_density == 1.0 for s in old.servers)

    sparse = with_communication(old, upload_density=0.25)
    assert load_plan(save_plan(sparse, tmp_path / "sparse.plan.yaml")) == sparse
    d = diff_plans(old, sparse)
    assert all(s.status == "changed" and s.upload_density == (1.0, 0.25)
               and s.download_density == (1.0, 1.0) for s in d.servers)
    console = Console(record=True, width=250)
    console.print(diff_table(d))
    text = console.export_text()
    assert "density up" in text and "1 → 1/4" in text


def test_planned_density_predicts_counted_bytes(tmp_path):
    """The plan's predicted upload bytes against a real payload at the planned density and wire
    precision: the prediction covers values, block scales and mask; only the header (its layout
    entry, under 128 bytes per matrix, and the payload's fixed metadata) comes on top."""
    from fedpipe.planning.strategies import make_plan
    from fedpipe.shapes import load_shapes

    # 1/4 density must be worth taking: each narrower precision priced, as before they were measured
    profile = yaml.safe_load(Path("tests/data/small.yaml").read_text())
    profile.setdefault("objective", {})["precision_quality"] = {"fp32": 1.0, "bf16": 0.998, "int8": 0.99,
                                                                "nf4": 0.9}
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(profile))
    plan = make_plan(tmp_path / "small.yaml")
    shapes = {m.name: m for m in load_shapes("smollm2-135m").matrices}
    sparse = [s for s in plan.servers if s.upload_density < 1 and s.upload_precision != "fp32"]
    assert sparse, "the edge server's 10 Mbit/s uplink should make the planner go sparse and lossy"
    gen = torch.Generator().manual_seed(0)
    for s in plan.servers:
        factors = {n: LoraFactors(torch.randn(r, shapes[n].d_in, generator=gen),
                                  torch.randn(shapes[n].d_out, r, generator=gen))
                   for n, r in s.rank_pattern.items()}
        zeros = {n: LoraFactors(torch.zeros_like(f.A), torch.zeros_like(f.B)) for n, f in factors.items()}
        counted = len(wire.encode(factors, density=s.upload_density, precision=s.upload_precision,
                                  reference=zeros))
        header = counted - s.predicted.upload_bytes
        assert 0 <= header <= 512 + 128 * len(factors), (s.name, s.upload_density, s.upload_precision, counted)
