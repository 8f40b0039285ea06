"""Hypothesis strategies shared by the codec's property tests."""

from __future__ import annotations

from hypothesis import strategies as st

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
