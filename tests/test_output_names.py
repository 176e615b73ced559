"""Output names are bounded in bytes, not characters: refused at submit, never failing in encode.

Linux file names hold 255 bytes; a CJK character is 3 of them in UTF-8. The store refuses an
output whose name does not fit (the API refuses the `code` that would make one, tests/test_http.py),
and the encoder's temp names for an output that fits always fit as well.
"""

from __future__ import annotations

import os

import pytest

from heygem.jobs import NAME_MAX, JobError, JobStore, OutputNameTooLong
from heygem.stages import WRITER_ROOM, temp_path
from tests.conftest import run_cli


def name(n_cjk: int, tail: str = "-r.mp4") -> str:
    return "视" * n_cjk + tail


def test_the_store_counts_bytes_not_characters(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    fits = store.submit("a.wav", "v.mp4", str(tmp_path / name(83)))  # 249 + 6 = 255 bytes
    assert fits.output.endswith(name(83))
    with pytest.raises(OutputNameTooLong) as err:
        store.submit("a.wav", "v.mp4", str(tmp_path / name(128)), code="long")  # 384 + 6 bytes, 134 characters
    assert isinstance(err.value, JobError) and isinstance(err.value, ValueError)
    assert str(err.value) == (f"output {tmp_path / name(128)}: its file name is 390 bytes (134 characters);"
                              f" a file name holds at most {NAME_MAX} bytes")
    assert store.by_code("long") is None, "nothing is queued"
    with pytest.raises(OutputNameTooLong, match=r"the folder name dddddddddddddddd\.\.\. is 300 bytes"):
        store.submit("a.wav", "v.mp4", str(tmp_path / ("d" * 300) / "o.mp4"))


@pytest.mark.parametrize("stem_bytes", [1, 200, 227, 228, 249, NAME_MAX - len(".mp4")])
def test_encode_temp_names_fit_whenever_the_output_fits(tmp_path, stem_bytes):
    final = tmp_path / ("x" * stem_bytes + ".mp4")
    for tag in ("video", "done"):
        temp = temp_path(final, tag)
        assert temp.parent == final.parent and temp.name.startswith(".") and temp.name.endswith(f".{tag}.mp4")
        assert len(os.fsencode(temp.name)) + WRITER_ROOM <= NAME_MAX  # heygem.video's own temp name fits
        if stem_bytes <= 227:
            assert temp.name == f".{final.stem}.{tag}.mp4"  # short names keep the readable form


def test_cut_temp_names_stay_valid_utf8_and_distinct(tmp_path):
    a, b = tmp_path / f"{'视' * 83}-a.mp4", tmp_path / f"{'视' * 83}-b.mp4"
    ta, tb = temp_path(a, "video"), temp_path(b, "video")
    assert ta != tb, "two long names sharing a prefix get different temp files"
    for t in (ta, tb):
        t.name.encode("utf-8")  # no half character left by the cut
        assert t.name.startswith(".视视")


def test_cli_submit_refuses_a_name_too_long(tmp_path):
    (tmp_path / "config.toml").write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    audio, video = tmp_path / "speech.wav", tmp_path / "face.mp4"
    audio.write_bytes(b"RIFF")
    video.write_bytes(b"\0\0\0\x18ftyp")
    out = tmp_path / name(128)
    done = run_cli("submit", str(audio), str(video), "--out", str(out),
                   env={"HEYGEM_OPS_CONFIG": str(tmp_path / "config.toml"), "COLUMNS": "300"})
    assert done.returncode == 2, done.stderr
    assert f"its file name is 390 bytes (134 characters); a file name holds at most {NAME_MAX} bytes" in done.stderr
    assert "Traceback" not in done.stderr
    assert JobStore(tmp_path / "state" / "jobs.sqlite3").counts()["queued"] == 0
