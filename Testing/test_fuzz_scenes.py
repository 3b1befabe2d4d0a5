"""Fuzzing the scene reader: any .mrml text or .mrb bytes give cases or a SceneError, never a crash,
and nothing is written outside the work folder."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

from conftest import slicerio_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MedSegUNetLib.core.errors import MedSegError
from training.scene_writer import ScenePair, scene_xml
from training.scenes import read_scene

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SAMPLE_XML = scene_xml(
    [ScenePair("ct", Path("ct.nrrd"), Path("s.seg.nrrd"), "seg")]
)  # names Data/ct.nrrd, Data/seg.seg.nrrd


def expect_clean(path, workdir) -> None:
    before = set(workdir.parent.iterdir())
    try:
        read_scene(path, workdir)
    except MedSegError as error:
        assert "\n" not in str(error)
    assert set(workdir.parent.iterdir()) <= before | {workdir}  # nothing new beside the work folder


def test_the_unmutated_sample_reads(tmp_path):
    """The fuzzed text starts from a scene that reads: mutations start from a valid case."""
    (tmp_path / "Data").mkdir()
    shutil.copyfile(slicerio_data("CTChest4.nrrd"), tmp_path / "Data" / "ct.nrrd")
    shutil.copyfile(slicerio_data("Segmentation.seg.nrrd"), tmp_path / "Data" / "seg.seg.nrrd")
    (tmp_path / "scene.mrml").write_text(SAMPLE_XML, encoding="utf-8")
    assert [case.name for case in read_scene(tmp_path / "scene.mrml", tmp_path / "work")] == ["scene/seg"]


@FUZZ
@given(st.data())
def test_mutated_mrml_text(tmp_path_factory, data):
    """Slices of a real scene's text replaced by random text (quotes, entities, tags, paths)."""
    text = SAMPLE_XML
    for _ in range(data.draw(st.integers(1, 4))):
        start = data.draw(st.integers(0, len(text)))
        end = data.draw(st.integers(start, min(len(text), start + 40)))
        insert = data.draw(
            st.sampled_from(
                ['"', "<", ">", "&amp;", "&x;", "../", "/etc/passwd", "%2e%2e/", "referenceImageGeometryRef:", ";", ""]
            )
            | st.text(max_size=12)
        )
        text = text[:start] + insert + text[end:]
    folder = tmp_path_factory.mktemp("scene")
    (folder / "Data").mkdir()  # real data files, so that mutations reach the readers behind the XML
    shutil.copyfile(slicerio_data("CTChest4.nrrd"), folder / "Data" / "ct.nrrd")
    shutil.copyfile(slicerio_data("Segmentation.seg.nrrd"), folder / "Data" / "seg.seg.nrrd")
    (folder / "scene.mrml").write_bytes(text.encode("utf-8", "replace"))
    expect_clean(folder / "scene.mrml", folder / "work")


MEMBER_NAME = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30) | st.sampled_from(
    ["../x.mrml", "/abs/x.mrml", "C:\\x.mrml", "a/../../b.mrml", "s/s.mrml", "s/Data/ct.nrrd", "s/", "./s.mrml"]
)  # zipfile itself cannot write a name with control characters (its own limit, not a reader input)


@FUZZ
@given(st.lists(st.tuples(MEMBER_NAME, st.binary(max_size=64)), max_size=5, unique_by=lambda member: member[0]))
def test_random_zip_members(tmp_path_factory, members):
    """Zips whose member names are arbitrary text ('..', absolute, drive letters, backslashes ...)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members:
            archive.writestr(name, content)
    folder = tmp_path_factory.mktemp("mrb")
    (folder / "scene.mrb").write_bytes(buffer.getvalue())
    expect_clean(folder / "scene.mrb", folder / "work")


@FUZZ
@given(st.binary(max_size=400))
def test_random_mrb_bytes(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("bytes")
    (folder / "scene.mrb").write_bytes(content)
    expect_clean(folder / "scene.mrb", folder / "work")
