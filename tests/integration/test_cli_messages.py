"""Bad inputs to `majortom embed` end in one line that names the input and what to do.

Before the fix: an empty band said "'driver' is required", a PNG band "band grid does not align",
a text file as weights "pop from empty list", a pickle as weights repeated torch's advice to set
`weights_only=False` (which would run the file's code), and a corrupt .safetensors, `--out` on a
read-only filesystem or onto a file, and `--batch-size 1000000000` ended in raw tracebacks.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from majortom_assets.cli import main


def _embed(capsys, collection: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["embed", "--collection", str(collection), "--model", "ssl4eo-s2", "--tiny", "--limit", "1",
                 "--out", str(out), "--no-progress", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("majortom: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_text_file_as_weights(s2l1c_collection, tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    weights.write_text("these are not weights\n")
    code, _, err = _embed(capsys, s2l1c_collection, tmp_path / "out", "--weights", str(weights))
    line = _one_line_error(err)
    assert code == 2 and str(weights) in line and "is not a PyTorch checkpoint" in line
    assert "pop from empty list" not in err


def test_pickle_with_objects_as_weights_never_suggests_unsafe_loading(s2l1c_collection, tmp_path, capsys):
    weights = tmp_path / "checkpoint.pth"
    torch.save({"conv1.weight": torch.zeros(1), "history": argparse.Namespace(epoch=3)}, weights)
    code, _, err = _embed(capsys, s2l1c_collection, tmp_path / "out", "--weights", str(weights))
    line = _one_line_error(err)
    assert code == 2 and str(weights) in line and "pickled Python objects" in line
    assert "weights_only=False" not in err and "weights_only" not in err


def test_corrupt_safetensors(s2l1c_collection, tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, _, err = _embed(capsys, s2l1c_collection, tmp_path / "out", "--weights", str(weights))
    line = _one_line_error(err)
    assert code == 2 and str(weights) in line and "not a valid .safetensors file" in line


def test_out_onto_a_file(s2l1c_collection, tmp_path, capsys):
    target = tmp_path / "existing.txt"
    target.write_text("keep me")
    code, _, err = _embed(capsys, s2l1c_collection, target, "--weights", "random")
    line = _one_line_error(err)
    assert code == 2 and "is a file, not a folder" in line and target.read_text() == "keep me"


def test_out_not_writable(s2l1c_collection, capsys):
    code, _, err = _embed(capsys, s2l1c_collection, Path("/sys/majortom-out"), "--weights", "random")
    line = _one_line_error(err)
    assert code == 2 and "/sys/majortom-out is not writable" in line


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare is part of Debian's base system")
def test_out_on_a_read_only_filesystem(s2l1c_collection, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    script = (f"mount -t tmpfs -o ro tmpfs {mount} && exec {sys.executable} -m majortom_assets.cli embed "
              f"--collection {s2l1c_collection} --model ssl4eo-s2 --tiny --weights random --limit 1 "
              f"--out {mount} --no-progress")
    proc = subprocess.run(check=False, args=["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env=os.environ.copy())
    assert proc.returncode == 2, proc.stderr
    line = _one_line_error(proc.stderr)
    assert f"--out {mount} is not writable (Read-only file system)" in line


def test_absurd_batch_size(s2l1c_collection, tmp_path, capsys):
    code, _, err = _embed(capsys, s2l1c_collection, tmp_path / "out", "--weights", "random",
                          "--batch-size", "1000000000")
    line = _one_line_error(err)
    assert code == 2 and "--batch-size" in line and "4096" in line and "1000000000" in line


def _png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size), np.uint16)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("replacement, reason", [
    (b"", "band is empty (0 bytes)"),
    (None, "band is a PNG image, not a GeoTIFF"),
])
def test_empty_or_png_band_costs_only_its_sample(s2l1c_collection, tmp_path, capsys, replacement, reason):
    collection = tmp_path / "Core-S2L1C"
    shutil.copytree(s2l1c_collection, collection)
    meta = pd.read_parquet(collection / "metadata.parquet")
    shard = collection / meta["parquet_url"].iloc[0]
    table = pq.read_table(shard)
    band = "B04"
    values = table.column(band).to_pylist()
    values[0] = replacement if replacement is not None else _png(1068)
    table = table.set_column(table.schema.get_field_index(band), band, pa.array(values, table.schema.field(band).type))
    pq.write_table(table, shard, row_group_size=1)
    code = main(["embed", "--collection", str(collection), "--model", "ssl4eo-s2", "--tiny", "--weights", "random",
                 "--limit", "2", "--out", str(tmp_path / "out"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "embedded 1 cells" in out and "skipped 1 sample(s)" in out
    skipped = [ln for ln in out.splitlines() if reason in ln]
    assert len(skipped) == 1 and "band=B04" in skipped[0] and meta["grid_cell"].iloc[0] in skipped[0]
