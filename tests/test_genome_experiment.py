"""The `genome` experiment end to end (tiny sizes), the planted long-range task, the held-out
split and the embedded genome."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from attnkit.experiment import RunContext
from attnkit.genome import EMBEDDED_GENOME_LENGTH, embedded_genome, embedded_genome_path
from attnkit.genome.experiment import (
    ARMS,
    EXPERIMENT,
    GenomeConfig,
    _task_model,
    fit_slope,
    run_genome,
    split_genome,
)
from attnkit.genome.model import GenomeEncoder, GenomePattern
from attnkit.genome.synthetic import IGNORE_INDEX, DistanceCurriculum, LongRangeTask
from attnkit.genome.train import train_mlm


def test_fit_slope():
    xs = [1e3, 1e4, 1e5]
    assert math.isclose(fit_slope(xs, [x**1.5 for x in xs]), 1.5, rel_tol=1e-9)
    assert math.isclose(fit_slope(xs, [3 * x for x in xs]), 1.0, rel_tol=1e-9)


def test_experiment_registered():
    assert EXPERIMENT.name == "genome"
    assert [o.flag for o in EXPERIMENT.options] == ["--fasta"]
    assert EXPERIMENT.options[0].dest == "fasta"


def test_embedded_genome_length_and_gc():
    (rec,) = embedded_genome()
    assert rec.name == "NC_000908.2" and len(rec) == EMBEDDED_GENOME_LENGTH == 580_076
    gc = (rec.sequence.count("G") + rec.sequence.count("C")) / len(rec)
    assert abs(gc - 0.317) < 0.001
    assert embedded_genome_path().stat().st_size < 200_000  # shipped compressed
    assert (embedded_genome_path().parent / "DATA.md").read_text().count("NC_000908.2")


@pytest.mark.parametrize("distance", [16, 100, 1000])
def test_long_range_task_distance_and_labels(distance):
    task = LongRangeTask(distance, distance + 300, seed=3)
    tokens, labels, sources = task.sample_with_sources(16, torch.Generator().manual_seed(0))
    m = task.motif_len
    for b in range(16):
        p = int(sources[b])
        assert torch.equal(tokens[b, p:p + m], task.marker)
        assert torch.equal(tokens[b, p + distance:p + distance + m], task.query)
        labelled = torch.nonzero(labels[b] != IGNORE_INDEX).flatten().tolist()
        assert labelled == list(range(p + distance, p + distance + m))  # exactly d downstream
        c = int(labels[b, p + distance])
        assert torch.equal(tokens[b, p + m:p + 2 * m], task.classes[c])  # class at the source
    with pytest.raises(ValueError, match="distance"):
        LongRangeTask(4, 100)
    with pytest.raises(ValueError, match="length"):
        LongRangeTask(100, 110)


def test_long_range_task_leaks_no_position():
    """Sources are spread over the whole allowed range, and the models' global tokens are the
    same evenly spaced positions whatever the sample: nothing in the input says where the
    answer is, and the token values are bases only."""
    task = LongRangeTask(200, 800, seed=0)
    tokens, _, sources = task.sample_with_sources(400, torch.Generator().manual_seed(1))
    assert int(tokens.min()) >= 0 and int(tokens.max()) <= 3
    hi = 800 - 200 - task.motif_len
    assert int(sources.min()) < 0.1 * hi and int(sources.max()) > 0.9 * hi
    cfg = GenomeConfig.tiny()
    hubs = _task_model(cfg, "window_exp_global").hub_positions(800)
    assert hubs.tolist() == _task_model(cfg, "window_global").hub_positions(800).tolist()
    assert torch.equal(hubs, _task_model(cfg, "window_global").pattern.hub_positions(800))
    assert _task_model(cfg, "window").hub_positions(800).numel() == 0
    assert ARMS["dense"] is None and _task_model(cfg, "dense").pattern is None
    # the hub positions do not follow the planted source (same for every sample)
    frac_at_hub = np.isin(sources.numpy(), hubs.numpy()).mean()
    assert frac_at_hub < 0.05


def test_curriculum_stages_shortest_first_and_no_position():
    """Stage s draws only from the s+1 shortest distances, every stage's distance does get
    drawn, the tasks share motifs, and the batches are plain LongRangeTask samples (bases
    only, labels only on the query motif)."""
    tasks = [LongRangeTask(d, d + max(d, 32), seed=3) for d in (100, 16, 40)]
    cur = DistanceCurriculum(tasks, steps_per_stage=30)
    assert [t.distance for t in cur.tasks] == [16, 40, 100] and cur.total_steps == 90
    gen = torch.Generator().manual_seed(0)
    lengths = [cur.sample(2, gen)[0].shape[1] for _ in range(90)]
    assert set(lengths[:30]) == {48}
    assert set(lengths[30:60]) == {48, 80}
    assert set(lengths[60:]) == {48, 80, 200}
    tokens, labels = cur.sample(4, gen)
    assert int(tokens.min()) >= 0 and int(tokens.max()) <= 3
    assert int((labels != IGNORE_INDEX).sum(1).min()) == tasks[0].motif_len
    with pytest.raises(ValueError, match="motifs"):
        DistanceCurriculum([LongRangeTask(16, 48, seed=0), LongRangeTask(40, 80, seed=1)], 5)
    with pytest.raises(ValueError, match="steps_per_stage"):
        DistanceCurriculum(tasks, 0)
    with pytest.raises(ValueError, match="empty"):
        DistanceCurriculum([], 5)


def test_curriculum_max_bases_caps_long_batches_only():
    """max_bases shrinks the batch where samples are long (never below one sample) and leaves
    short distances at the asked batch; the stages still draw shortest first."""
    tasks = [LongRangeTask(d, d + max(d, 32), seed=3) for d in (16, 100)]  # 48, 200 bases
    capped = DistanceCurriculum(tasks, steps_per_stage=10, max_bases=300)
    gen = torch.Generator().manual_seed(0)
    shapes = [tuple(capped.sample(8, gen)[0].shape) for _ in range(20)]
    assert set(shapes[:10]) == {(6, 48)}  # 300 // 48 = 6
    assert set(shapes[10:]) == {(6, 48), (1, 200)}  # 300 // 200 = 1
    assert DistanceCurriculum(tasks, 5).batch_for(tasks[1], 8) == 8
    assert DistanceCurriculum(tasks, 5, max_bases=10).batch_for(tasks[0], 8) == 1
    with pytest.raises(ValueError, match="max_bases"):
        DistanceCurriculum(tasks, 5, max_bases=0)


def test_train_mlm_early_stopping_stops_and_keeps_best():
    """With lr 0 validation never improves: training stops after the first evaluation plus
    `patience` more, far before the cap; history records every evaluation."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4, (4096,), generator=gen)
    model = GenomeEncoder(8, 1, 2, GenomePattern(4, exponential=False, hubs=0))
    history: list = []
    losses = train_mlm(model, tokens, steps=50, window_len=256, lr=0.0, valid=tokens[:512],
                       eval_every=2, patience=2, valid_stride=8, history=history)
    assert len(losses) == 6 and [h[0] for h in history] == [2, 4, 6]
    assert history[0][1] == history[-1][1]
    with pytest.raises(ValueError, match="patience"):
        train_mlm(model, tokens, steps=5, window_len=256, valid=tokens[:512], patience=0)


def test_split_genome_disjoint_and_covering():
    tokens = torch.arange(1003)
    train, valid, held = split_genome(tokens)
    assert held.numel() == 100 and valid.numel() == 100 and train.numel() == 803
    assert torch.equal(torch.cat([train, valid, held]), tokens)
    assert not set(held.tolist()) & (set(train.tolist()) | set(valid.tolist()))
    assert int(held[0]) == 903  # the last 10% of the chromosome


@pytest.mark.slow
def test_run_tiny_on_embedded_genome(tmp_path):
    ctx = RunContext(quick=True, out_dir=tmp_path)
    res = run_genome(ctx, GenomeConfig.tiny())
    m = res.all_metrics()
    for key in ("slope_window", "slope_window_global", "slope_window_exp_global",
                "slope_window_exp_global_ci_high", "hub_task_acc_local", "hub_task_acc_global",
                "hub_task_acc_window_exp_at_40", "hub_task_acc_dense_at_40",
                "hub_task_acc_window_at_16", "cpu_seconds_task", "genome_steps_run",
                "bits_per_base_model", "bits_per_base_model_ci_low",
                "bits_per_base_markov_best", "whole_genome_forward_s", "whole_genome_peak_gib",
                "train_step_s"):
        assert key in m and math.isfinite(m[key]), key
    assert "mem_slope_window_exp_global_ci_high" in m  # tiny forwards may add no pages: NaN
    assert m["whole_genome_length"] == 580_076  # the embedded genome by default
    assert 0 < m["whole_genome_peak_gib"] < 8
    assert 1.7 < m["bits_per_base_markov_best"] < 2.0
    assert res.verdict in ("held", "not held", "inconclusive") and res.notes
    names = {d.name for d in res.decisions}
    assert {"slope_window", "slope_window_global", "slope_window_exp_global",
            "hub_task_gain_window_global", "hub_task_gain_window_exp_global",
            "whole_genome_peak_gib", "mem_slope_window", "mem_slope_window_global",
            "mem_slope_window_exp_global"} <= names
    assert m["genome_steps_run"] <= 4  # tiny: early stopping with a cap of 4 steps
    assert "bits_per_base_gain_vs_markov" not in names  # its own decision, in the notes
    json.dumps(m)


def test_fasta_too_short_for_window(tmp_path):
    path = tmp_path / "short.fa"
    path.write_text(">tiny\nACGTACGT\n")
    ctx = RunContext(quick=True, out_dir=tmp_path, options={"fasta": str(path)})
    with pytest.raises(ValueError, match=r"short\.fa:1: record 'tiny' has 8 bases"):
        run_genome(ctx, GenomeConfig.tiny())
