"""The `genome` experiment end to end (tiny sizes), and the whole-genome pass on real data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from attnkit.genome.experiment import EXPERIMENT, GenomeConfig, fit_slope, run_genome
from attnkit.results import RunContext

GENOME = "genomes/Mycoplasma_genitalium_GCF_000027325.1.fna"


def _genome(shared_data: Path) -> Path:
    path = shared_data / GENOME
    if not path.exists():
        pytest.skip("M. genitalium genome not present")
    return path


def test_fit_slope():
    xs = [1e3, 1e4, 1e5]
    assert math.isclose(fit_slope(xs, [x**1.5 for x in xs]), 1.5, rel_tol=1e-9)
    assert math.isclose(fit_slope(xs, [3 * x for x in xs]), 1.0, rel_tol=1e-9)


def test_experiment_registered():
    assert EXPERIMENT.name == "genome"
    assert [o.flag for o in EXPERIMENT.options] == ["--fasta"]
    assert EXPERIMENT.options[0].dest == "fasta"


@pytest.mark.slow
def test_run_tiny_with_fasta(tmp_path, shared_data):
    fasta = _genome(shared_data)
    ctx = RunContext(quick=True, out_dir=tmp_path, options={"fasta": str(fasta)})
    res = run_genome(ctx, GenomeConfig.tiny())
    m = res.metrics
    for key in ("slope_window_global", "slope_dense", "hub_task_acc_local", "hub_task_acc_global",
                "bits_per_base_model", "bits_per_base_markov_best", "whole_genome_forward_s",
                "whole_genome_peak_gib"):
        assert key in m and math.isfinite(m[key]), key
    # the whole genome went through one streaming forward pass (in a fresh process)
    assert m["whole_genome_length"] == 580_076
    assert 0 < m["whole_genome_peak_gib"] < 8
    # order-k Markov on a real genome beats 2 bits (uniform) but not by much
    assert 1.7 < m["bits_per_base_markov_best"] < 2.0
    assert 1.0 < m["bits_per_base_model"] < 3.0
    # pair counts are exact: window+global grows linearly, dense quadratically
    assert 0.95 < m["pairs_slope_window_global"] < 1.05
    assert math.isclose(m["pairs_slope_dense"], 2.0, rel_tol=1e-6)
    assert isinstance(res.held, bool) and res.notes
    json.dumps(m)  # metrics are plain numbers


def test_fasta_too_short_for_window(tmp_path):
    path = tmp_path / "short.fa"
    path.write_text(">tiny\nACGTACGT\n")
    ctx = RunContext(quick=True, out_dir=tmp_path, options={"fasta": str(path)})
    from attnkit.genome.experiment import _fasta_part

    with pytest.raises(ValueError, match=r"short\.fa:1: record 'tiny' has 8 bases"):
        _fasta_part(ctx, GenomeConfig.tiny(), path)
