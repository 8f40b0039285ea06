"""Hypothesis strategies shared by the codec's property tests."""

from __future__ import annotations

import datetime

from hypothesis import strategies as st

from . import model

#: Every msgpack type a message may hold; tuples are sent as arrays, so the
#: round trip compares against lists.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
)

values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(
            st.one_of(st.text(), st.integers(-100, 100), st.binary()), children, max_size=5
        ),
    ),
    max_leaves=20,
)

messages = st.tuples(st.text(min_size=1), st.lists(values, max_size=5)).map(
    lambda pair: (pair[0], *pair[1])
)

# Registered values (tests.model registers their classes) and datetimes.

#: Aware datetimes in any zone a whole number of minutes from UTC, years 1 to
#: 9999 as seen in UTC (datetime's own range).
datetimes = st.datetimes(
    min_value=datetime.datetime(2, 1, 1),
    max_value=datetime.datetime(9998, 12, 31),
    timezones=st.builds(
        datetime.timezone,
        st.timedeltas(datetime.timedelta(hours=-23), datetime.timedelta(hours=23)).map(
            lambda delta: datetime.timedelta(minutes=delta // datetime.timedelta(minutes=1))
        ),
    ),
)

points = st.builds(model.Point, st.integers(-(2**63), 2**63 - 1), st.integers(-100, 100))

records = st.builds(
    model.Record,
    st.integers(-(2**63), 2**64 - 1),
    st.text(),
    st.floats(allow_nan=False),
    st.binary(),
    st.one_of(st.none(), st.text()),
)

shapes = st.builds(
    model.Shape,
    st.text(),
    st.lists(points, max_size=4),
    st.dictionaries(st.text(), st.one_of(values, points, records), max_size=3),
    st.one_of(st.none(), datetimes),
)
