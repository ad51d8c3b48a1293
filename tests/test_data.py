"""``--data`` CSV files: every problem names the file, the line and the column; a missing header and a wrong
delimiter are recognised (a header-less file must not silently lose its first row)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from iteravg.mx.data import load, read_csv


def write(tmp_path: Path, text: str, name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def rows(n: int, sep: str = ",") -> str:
    return "\n".join(sep.join(str(i * 10 + j) for j in range(3)) for i in range(n))


def test_a_valid_file_keeps_every_row_and_picks_the_target_column(tmp_path):
    path = write(tmp_path, "a,target,b\n" + rows(12) + "\n\n")  # a trailing blank line is fine
    x, y = read_csv(path)
    assert x.shape == (12, 2) and y.shape == (12,)
    np.testing.assert_array_equal(y, [i * 10 + 1 for i in range(12)])  # the column named target
    np.testing.assert_array_equal(x[:, 1], [i * 10 + 2 for i in range(12)])
    x, y = read_csv(write(tmp_path, "\ufeffa,b,c\n" + rows(12)))  # UTF-8 BOM; no 'target': the last column
    np.testing.assert_array_equal(y, [i * 10 + 2 for i in range(12)])
    ds = load(str(path))
    assert len(ds.train[1]) + len(ds.val[1]) + len(ds.test[1]) == 12 and ds.name == "d.csv"


def test_a_file_without_header_is_refused_not_silently_shortened(tmp_path):
    path = write(tmp_path, rows(12))
    with pytest.raises(ValueError) as err:
        read_csv(path)
    msg = str(err.value)
    assert "no header row" in msg and "line 1" in msg and str(path) in msg and "x1,x2,target" in msg


@pytest.mark.parametrize("sep,word", [(";", "semicolons"), ("\t", "tabs")])
def test_a_wrong_delimiter_gets_a_hint(tmp_path, sep, word):
    path = write(tmp_path, sep.join(["a", "b", "target"]) + "\n" + rows(12, sep))
    with pytest.raises(ValueError) as err:
        read_csv(path)
    msg = str(err.value)
    assert str(path) in msg and "line 1" in msg and word in msg and "comma-separated" in msg and "tr '" in msg
    # A comma header over semicolon rows: the first such row is named, with the same hint.
    path = write(tmp_path, "a,b,target\n1,2,3\n" + rows(3, sep), name="mixed.csv")
    with pytest.raises(ValueError, match=rf"mixed.csv line 3 has 1 field\(s\), the header \(line 1\) has 3.*{word}"):
        read_csv(path)


@pytest.mark.parametrize("body,needle", [
    ("1,2,3\n4,,6\n", "line 3, column 2 ('b') is empty"),
    ("1,2,3\n4,five,6\n", "line 3, column 2 ('b'): 'five' is not a number"),
    ("1,2,3\n\n4,5,inf\n", "line 4, column 3 ('target'): 'inf' is not a finite number"),  # blank lines counted
    ("1,2,3\n4,nan,6\n", "line 3, column 2 ('b'): 'nan' is not a finite number"),
    ("1,2,3\n4,5\n", "line 3 has 2 field(s), the header (line 1) has 3"),
])
def test_bad_values_name_file_line_and_column(tmp_path, body, needle):
    path = write(tmp_path, "a,b,target\n" + body)
    with pytest.raises(ValueError) as err:
        read_csv(path)
    assert needle in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("content,needle", [
    (b"", "is empty"),
    (b"a,b,target\n", "no data rows"),
    (b"a,,target\n1,2,3\n", "column 2: empty column name"),
    (b"abc\n1\n", "single column"),
    (b"a,b,target\n1,2,3\n\xff\xfe,1,2\n", "line 3 is not UTF-8"),
])
def test_malformed_files(tmp_path, content, needle):
    path = write(tmp_path, content)
    with pytest.raises(ValueError, match=None) as err:
        read_csv(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_missing_file_directory_and_too_few_rows(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        read_csv(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="is a directory"):
        read_csv(tmp_path)
    path = write(tmp_path, "a,b,target\n" + rows(9))
    with pytest.raises(ValueError, match=r"d.csv has 9 data rows; at least 10"):
        load(str(path))
