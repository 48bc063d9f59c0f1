"""Readers for trophic-flow networks: the Pajek files of the SCOR collection, the SCOR text
format, and bad input (including fuzzing)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.ecology import FoodWeb, parse_pajek, parse_scor, read_pajek, read_scor, write_scor

SMALL_PAJEK = """\
% a tiny web: grass -> rabbit -> fox, detritus recycles
*partition ECO types / tiny
*vertices 6
1
1
1
2
3
5

*network tiny
*vertices 6
   1 "grass"
   2 "rabbit"
   3 "fox"
   4 "detritus"
   5 "Input"
   6 "Respiration"
*arcs
   5   1  100.0
   1   2   20.0
   2   3    4.0
   1   4   30.0
   4   2    1.5
   1   6   50.0
*vector bio-masses / tiny
*vertices 6
  10.0
   2.0
   0.5
   7.0
   0.0
   0.0
"""

SMALL_SCOR = """\
tiny hand-written SCOR network
4 3
grass
rabbit
fox
detritus
1 10.0
2 2.0
3 0.5
4 7.0
-1
1 100.0
-1
3 1.25
-1
1 50.0
2 14.5
3 2.75
-1
1 2 20.0
2 3 4.0
1 4 30.0
4 2 1.5
-1 -1
"""


def test_parse_pajek_small() -> None:
    web = parse_pajek(SMALL_PAJEK, title="tiny")
    assert web.names == ("grass", "rabbit", "fox", "detritus", "Input", "Respiration")
    assert web.types == ("living", "living", "living", "detritus", "import", "respiration")
    assert web.flows[0, 1] == 20.0 and web.flows[4, 0] == 100.0 and web.flows[1, 0] == 0.0
    assert web.num_links == 6
    np.testing.assert_array_equal(web.biomass, [10, 2, 0.5, 7, 0, 0])
    living = web.living()
    assert living.names == ("grass", "rabbit", "fox")
    np.testing.assert_array_equal(living.flows, [[0, 20, 0], [0, 0, 4], [0, 0, 0]])


def test_read_every_shared_pajek_file(shared_data) -> None:
    files = sorted((shared_data / "foodwebs").glob("*.paj"))
    if not files:
        pytest.skip("no foodwebs/*.paj in shared data")
    usable = 0
    for path in files:
        web = read_pajek(path)
        n = web.num_compartments
        assert n >= 3 and web.flows.shape == (n, n) and web.biomass.shape == (n,)
        assert (web.flows >= 0).all() and web.num_links > 0
        # Every SCOR web has exactly one Input, Output and Respiration vertex.
        for kind in ("import", "export", "respiration"):
            assert web.types.count(kind) == 1, (path.name, kind)
        # Boundary flows only go the right way.
        types = np.array(web.types)
        assert not web.flows[:, types == "import"].any()
        assert not web.flows[types == "export"].any()
        try:
            living = web.living()
        except ValueError as e:  # the Rhode River water budget has no living compartment
            assert "empty living sub-web" in str(e)
            continue
        usable += 1
        assert set(living.types) == {"living"} and living.num_links > 0
    assert usable >= len(files) - 1


def test_chesapeake_known_values(shared_data) -> None:
    path = shared_data / "foodwebs" / "Chesapeake.paj"
    if not path.exists():
        pytest.skip("Chesapeake.paj not present")
    web = read_pajek(path)
    assert web.num_compartments == 39 and web.types.count("living") == 33
    assert web.names[0] == "phytoplankton"
    assert web.flows[36, 0] == pytest.approx(522650.0)  # Input -> phytoplankton
    assert web.flows[0, 6] == pytest.approx(33671.45)  # phytoplankton -> ciliates
    assert web.biomass[0] == pytest.approx(3480.0)


def test_read_scor_hand_written(tmp_path) -> None:
    path = tmp_path / "tiny.scor"
    path.write_text(SMALL_SCOR)
    web = read_scor(path)
    assert web.names == ("grass", "rabbit", "fox", "detritus", "Input", "Output", "Respiration")
    assert web.types == ("living",) * 3 + ("detritus", "import", "export", "respiration")
    f = web.flows
    assert f[0, 1] == 20.0 and f[1, 2] == 4.0 and f[0, 3] == 30.0 and f[3, 1] == 1.5
    assert f[4, 0] == 100.0  # import
    assert f[2, 5] == 1.25  # export of fox
    np.testing.assert_array_equal(f[:4, 6], [50.0, 14.5, 2.75, 0.0])  # respirations
    np.testing.assert_array_equal(web.biomass, [10, 2, 0.5, 7, 0, 0, 0])
    # Same web as the Pajek text up to the boundary vertices.
    pajek = parse_pajek(SMALL_PAJEK)
    np.testing.assert_array_equal(web.living().flows, pajek.living().flows)


def test_scor_round_trip(tmp_path) -> None:
    web = parse_scor(SMALL_SCOR)
    path = tmp_path / "out.scor"
    write_scor(web, path)
    again = read_scor(path)
    assert again.names == web.names and again.types == web.types
    np.testing.assert_array_equal(again.flows, web.flows)
    np.testing.assert_array_equal(again.biomass, web.biomass)


def test_scor_round_trip_real_web(shared_data, tmp_path) -> None:
    path = shared_data / "foodwebs" / "StMarks.paj"
    if not path.exists():
        pytest.skip("StMarks.paj not present")
    web = read_pajek(path)
    out = tmp_path / "stmarks.scor"
    write_scor(web, out)
    again = read_scor(out)
    np.testing.assert_array_equal(again.living().flows, web.living().flows)
    assert again.living().names == web.living().names


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SMALL_PAJEK.replace("   2   3    4.0", "   2   3   -4.0"), "negative flow"),
        (SMALL_PAJEK.replace("   2   3    4.0", "   2   9    4.0"), "unknown vertex"),
        (SMALL_PAJEK.replace("   2   3    4.0", "   2   3    nan"), "finite"),
        (SMALL_PAJEK.replace("   2   3    4.0", "   1   2    4.0"), "duplicate arc"),
        (SMALL_PAJEK.replace("*arcs", "*edges"), "not supported"),
        (SMALL_PAJEK.replace("\n3\n5\n", "\n3\n7\n"), "partition code"),
        (SMALL_PAJEK.replace("   0.5\n", "  -0.5\n"), "biomass"),
        (SMALL_PAJEK.replace("*vertices 6\n   1", "*vertices 7\n   1"), "vertices"),
        (SMALL_PAJEK.replace("*network tiny\n*vertices 6", "*network tiny\n*vertices 99999"),
         "vertex count"),
        ("*arcs\n1 2 3.0\n", "no vertex list"),
        ("*frobnicate\n", "unknown section"),
    ],
)
def test_pajek_bad_input(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pajek(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SMALL_SCOR.replace("1 2 20.0", "1 2 -20.0"), "negative flow"),
        (SMALL_SCOR.replace("1 2 20.0", "1 9 20.0"), "not a compartment"),
        (SMALL_SCOR.replace("-1 -1\n", ""), "terminator"),
        (SMALL_SCOR.replace("4 3\n", "4 5\n"), "living"),
        (SMALL_SCOR.replace("3 1.25", "3 -1.25"), "negative export"),
        (SMALL_SCOR.replace("1 2 20.0", "1 2"), "3 fields"),
        ("title only\n", "n_living"),
    ],
)
def test_scor_bad_input(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_scor(text)


def test_foodweb_validation_and_empty_living() -> None:
    with pytest.raises(ValueError, match="negative flow"):
        FoodWeb(names=("a", "b"), types=("living", "living"), flows=[[0, -1], [0, 0]],
                biomass=[1, 1])
    with pytest.raises(ValueError, match="compartment types"):
        FoodWeb(names=("a",), types=("plant",), flows=[[0]], biomass=[1])
    web = FoodWeb(names=("d", "in"), types=("detritus", "import"), flows=[[0, 0], [1, 0]],
                  biomass=[1, 0])
    with pytest.raises(ValueError, match="empty living sub-web"):
        web.living()


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_pajek_random_bytes(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "x.paj"
    path.write_bytes(data)
    try:
        read_pajek(path)
    except ValueError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_fuzz_pajek_mutated_lines(seed: int) -> None:
    """Delete, duplicate, swap or garble lines of a valid file: a FoodWeb or a ValueError."""
    rng = random.Random(seed)
    lines = SMALL_PAJEK.splitlines()
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(lines))
        op = rng.choice(["delete", "duplicate", "swap", "garble", "number"])
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "garble":
            chars = list(lines[i]) or [" "]
            chars[rng.randrange(len(chars))] = rng.choice('*"%-x0 9\t.e')
            lines[i] = "".join(chars)
        else:
            lines[i] = f"{rng.randint(-3, 12)} {rng.randint(-3, 12)} {rng.uniform(-5, 5)}"
        if not lines:
            lines = [""]
    try:
        web = parse_pajek("\n".join(lines))
    except ValueError:
        return
    assert (web.flows >= 0).all() and np.isfinite(web.flows).all()


# ------------------------------------------------------- issue 17: counts that disagree


@pytest.mark.parametrize("declared", [5, 6, 8])
def test_scor_count_larger_than_names(declared: int) -> None:
    """A count above the names made a data line a name and lost a biomass; now an error."""
    text = SMALL_SCOR.replace("\n4 3\n", f"\n{declared} 3\n")
    with pytest.raises(ValueError, match=rf"line 7: compartment name '1 10\.0' looks like a "
                                         rf"data line; line 2 declares {declared} compartments "
                                         r"but only 4 names"):
        parse_scor(text)


@pytest.mark.parametrize("declared", [2, 3])
def test_scor_count_smaller_than_names(declared: int) -> None:
    text = SMALL_SCOR.replace("\n4 3\n", f"\n{declared} 2\n")
    with pytest.raises(ValueError, match=rf"a name\? line 2 declares {declared} compartments"):
        parse_scor(text)


def test_scor_count_mismatch_names_the_file(tmp_path) -> None:
    path = tmp_path / "web.scor"
    path.write_text(SMALL_SCOR.replace("\n4 3\n", "\n5 3\n"))
    with pytest.raises(ValueError, match=r"web\.scor: line 7: compartment name"):
        read_scor(path)


def test_pajek_vertex_counts_that_disagree() -> None:
    fewer = SMALL_PAJEK.replace("*network tiny\n*vertices 6", "*network tiny\n*vertices 5")
    with pytest.raises(ValueError, match=r"more vertex lines than the 5 that '\*vertices 5' on "
                                         r"line 12 declares"):
        parse_pajek(fewer)
    more = SMALL_PAJEK.replace("*network tiny\n*vertices 6", "*network tiny\n*vertices 7")
    with pytest.raises(ValueError, match="expected 7 lines after \\*vertices, found 6"):
        parse_pajek(more)
    partition = SMALL_PAJEK.replace("*vertices 6\n1\n", "*vertices 5\n1\n", 1)
    with pytest.raises(ValueError, match=r"more vertex lines than the 5"):
        parse_pajek(partition)
    arc = SMALL_PAJEK.replace("   1   6   50.0", "   1   9   50.0")
    with pytest.raises(ValueError, match=r"arc to unknown vertex 9 \(vertices are 1\.\.6\)"):
        parse_pajek(arc)
