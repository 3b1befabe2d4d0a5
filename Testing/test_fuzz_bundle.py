"""Fuzzing the bundle reader: any bytes give a bundle or a MedSegError, never a crash or code run."""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MedSegUNetLib.core.errors import MedSegError
from MedSegUNetLib.model.bundle import METADATA_KEY, load_bundle, read_bundle_metadata

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _expect_clean(path) -> None:
    try:
        load_bundle(path)
    except MedSegError as error:
        assert str(path) in str(error) and "\n" not in str(error)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "b.safetensors"
    path.write_bytes(content)
    _expect_clean(path)


@FUZZ
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20,
    )
)
def test_random_metadata_documents(tmp_path_factory, document):
    header = json.dumps({"__metadata__": {METADATA_KEY: json.dumps(document)}}).encode()
    path = tmp_path_factory.mktemp("fuzz") / "b.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    _expect_clean(path)


@FUZZ
@given(st.data())
def test_mutated_real_bundle(tmp_path_factory, small_bundle, data):
    """Flip bytes of a real bundle's header and metadata: a clean error or a bundle that still validates."""
    original = bytearray(small_bundle.read_bytes())
    header_length = struct.unpack("<Q", bytes(original[:8]))[0]
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, 8 + header_length - 1))
        original[position] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("fuzz") / "b.safetensors"
    path.write_bytes(bytes(original))
    try:
        meta = read_bundle_metadata(path)
        meta.validate()
    except MedSegError:
        pass
    _expect_clean(path)
