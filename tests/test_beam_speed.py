"""The tests' memoized ``get_dofn_specs`` (tests/beam_speed.py) answers as Beam's own does."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.coders import VarIntCoder
from apache_beam.transforms import userstate


class _Stateful(beam.DoFn):
    COUNT = userstate.ReadModifyWriteStateSpec("count", VarIntCoder())
    FLUSH = userstate.TimerSpec("flush", userstate.TimeDomain.WATERMARK)

    def process(self, element, count=beam.DoFn.StateParam(COUNT), flush=beam.DoFn.TimerParam(FLUSH)):
        yield element

    @userstate.on_timer(FLUSH)
    def on_flush(self):
        return []


class _Twice(beam.DoFn):
    COUNT = userstate.ReadModifyWriteStateSpec("count", VarIntCoder())

    def process(self, element, a=beam.DoFn.StateParam(COUNT), b=beam.DoFn.StateParam(COUNT)):
        yield element


def test_memoized_specs_equal_beams_and_each_instance_is_its_own():
    memoized = userstate.get_dofn_specs
    assert memoized.memoized, "tests/conftest.py did not install it"
    stateful, plain = _Stateful(), beam.Map(str).fn
    for dofn in (stateful, plain):
        for _ in range(3):  # the first answer computed, the next ones kept
            assert memoized(dofn) == memoized.computed(dofn)
    assert memoized(stateful) == ({_Stateful.COUNT}, {_Stateful.FLUSH})
    assert memoized(plain) == (set(), set())
    assert userstate.is_stateful_dofn(stateful) and not userstate.is_stateful_dofn(plain)
    memoized(stateful)[0].clear()  # a caller's copy: the kept answer stays
    assert memoized(stateful)[0] == {_Stateful.COUNT}


def test_a_malformed_dofn_still_fails_every_time():
    for _ in range(2):
        with pytest.raises(ValueError, match="duplicate"):
            userstate.get_dofn_specs(_Twice())
