"""Tests for fedge.data.files: the .npz and .csv loaders and the suffix dispatcher."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fedge.data.files import load_csv, load_file, load_npz
from fedge.errors import DataError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# .npz
# ---------------------------------------------------------------------------


def test_npz_loads_x_and_y(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([[1, 2], [3, 4], [5, 6]]), y=np.array([0, 1, 0]))
    ds = load_npz(path)
    assert ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64
    assert ds.x.tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert ds.y.tolist() == [0, 1, 0]


def test_npz_flattens_image_shaped_features(tmp_path: Path) -> None:
    path = tmp_path / "img.npz"
    np.savez_compressed(path, x=np.ones((2, 3, 3), dtype=np.uint8), y=np.array([1, 2]))
    assert load_npz(str(path)).x.shape == (2, 9)


def test_npz_ignores_extra_arrays(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 1)), y=np.array([0, 1]), names=np.array(["a", "b"]))
    assert len(load_npz(path)) == 2


@pytest.mark.parametrize("missing", ["x", "y"])
def test_npz_missing_array_is_refused(tmp_path: Path, missing: str) -> None:
    path = tmp_path / "d.npz"
    present = "y" if missing == "x" else "x"
    np.savez(path, **{present: np.zeros(2, dtype=np.int64)})  # type: ignore[arg-type]
    with pytest.raises(DataError, match=rf"d\.npz: missing array '{missing}'"):
        load_npz(path)


def test_npz_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    x = np.empty((2, 1), dtype=object)
    x[0, 0], x[1, 0] = 1.0, 2.0
    np.savez(path, x=x, y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"obj\.npz: cannot read array 'x'"):
        load_npz(path)


def test_npz_string_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, x=np.array([["1"], ["2"]]), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"s\.npz: array 'x' must be numeric, got dtype <U1"):
        load_npz(path)


def test_npz_complex_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, x=np.ones((2, 1), dtype=np.complex64), y=np.array([0, 1]))
    with pytest.raises(DataError, match="must be numeric, got dtype complex64"):
        load_npz(path)


@pytest.mark.parametrize(
    ("x", "y", "fragment"),
    [
        (np.zeros(3), np.array([0, 1, 0]), "features must be 2-D"),
        (np.zeros((3, 2)), np.zeros((3, 1), dtype=np.int64), "labels must be 1-D"),
        (np.zeros((3, 2)), np.array([0, 1]), "3 feature rows but 2 labels"),
        (np.zeros((0, 2)), np.zeros(0, dtype=np.int64), "no examples"),
        (np.array([[0.0], [np.nan]]), np.array([0, 1]), "must be finite"),
        (np.zeros((2, 1)), np.array([0.0, 1.5]), "labels must be integers >= 0"),
        (np.zeros((2, 1)), np.array([0, -1]), "labels must be integers >= 0"),
    ],
)
def test_npz_bad_shapes_and_values_are_refused(
    tmp_path: Path, x: np.ndarray, y: np.ndarray, fragment: str
) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(DataError) as e:
        load_npz(path)
    assert str(e.value).startswith(str(path))
    assert fragment in str(e.value)


def test_npz_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absent.npz"
    with pytest.raises(DataError, match=re.escape(f"{path}: no such file")):
        load_npz(path)


def test_npz_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DataError, match=r"junk\.npz: cannot read as an \.npz archive"):
        load_npz(path)


def test_npz_holding_a_single_npy_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "single.npz"
    with path.open("wb") as f:
        np.save(f, np.zeros((2, 2)))
    with pytest.raises(DataError, match=r"single\.npz: not an \.npz archive"):
        load_npz(path)


def test_npz_pickle_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.npz"
    with path.open("wb") as f:
        np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"pickled\.npz: cannot read as an \.npz archive"):
        load_npz(path)


# ---------------------------------------------------------------------------
# .csv: accepted forms
# ---------------------------------------------------------------------------


def test_csv_without_header(tmp_path: Path) -> None:
    ds = load_csv(write(tmp_path / "d.csv", "1,2,0\n3,4,1\n5,6,2\n"))
    assert ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64
    assert ds.x.tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert ds.y.tolist() == [0, 1, 2]


def test_csv_with_header(tmp_path: Path) -> None:
    ds = load_csv(write(tmp_path / "d.csv", "a,b,label\n1.5,-2e-1,1\n0,0,0\n"))
    assert ds.x.tolist() == [[1.5, pytest.approx(-0.2)], [0.0, 0.0]]
    assert ds.y.tolist() == [1, 0]


def test_csv_blank_lines_crlf_spaces_and_bom_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbfx1, x2 ,y\r\n\r\n 1 , 2 , 3\r\n   \r\n4,5,6\r\n\r\n")
    ds = load_csv(path)
    assert ds.x.tolist() == [[1.0, 2.0], [4.0, 5.0]]
    assert ds.y.tolist() == [3, 6]


def test_csv_label_written_as_float_is_accepted(tmp_path: Path) -> None:
    assert load_csv(write(tmp_path / "d.csv", "1,2.0\n2,1e0\n")).y.tolist() == [2, 1]


def test_csv_single_row(tmp_path: Path) -> None:
    ds = load_csv(write(tmp_path / "d.csv", "0.5,7"))
    assert ds.x.shape == (1, 1)
    assert ds.y.tolist() == [7]


# ---------------------------------------------------------------------------
# .csv: refused forms
# ---------------------------------------------------------------------------


def test_csv_non_numeric_cell_names_line_column_and_text(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,b,label\n1,2,0\n3,oops,1\n")
    with pytest.raises(DataError) as e:
        load_csv(path)
    assert str(e.value) == f"{path}: line 3, column 2: 'oops' is not a number"


def test_csv_line_numbers_count_header_and_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,b,label\n\n1,2,0\n\n\n3,4,x\n")
    with pytest.raises(DataError, match="line 6, column 3: 'x' is not a number"):
        load_csv(path)


def test_csv_empty_cell_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="line 2, column 2: '' is not a number"):
        load_csv(write(tmp_path / "d.csv", "1,2,0\n3,,1\n"))


def test_csv_partly_numeric_first_row_is_not_a_header(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="line 1, column 1: 'id' is not a number"):
        load_csv(write(tmp_path / "d.csv", "id,2,label\n1,2,0\n"))


def test_csv_ragged_row_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "1,2,0\n3,4,1\n5,1\n")
    with pytest.raises(DataError, match=r"d\.csv: line 3 has 2 cells, expected 3"):
        load_csv(path)


def test_csv_ragged_row_with_bad_cell_reports_the_first_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="line 2, column 1: 'q' is not a number"):
        load_csv(write(tmp_path / "d.csv", "1,2,0\nq,4,1\n5,1\n"))


@pytest.mark.parametrize("cell", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
def test_csv_non_finite_feature_names_line_and_column(tmp_path: Path, cell: str) -> None:
    path = write(tmp_path / "d.csv", f"f,g,y\n1,2,0\n3,{cell},1\n")
    with pytest.raises(DataError) as e:
        load_csv(path)
    assert str(e.value) == f"{path}: line 3, column 2: {cell!r} is not a finite number"


def test_csv_non_finite_label_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="line 1, column 2: 'nan' is not a finite number"):
        load_csv(write(tmp_path / "d.csv", "1,nan\n"))


@pytest.mark.parametrize("label", ["1.5", "-1", "1e12"])
def test_csv_bad_label_names_line_and_column(tmp_path: Path, label: str) -> None:
    path = write(tmp_path / "d.csv", f"1,2,0\n3,4,{label}\n")
    with pytest.raises(DataError, match=f"line 2, column 3: label '{re.escape(label)}' is not"):
        load_csv(path)


@pytest.mark.parametrize("text", ["", "\n", "  \n\n \r\n"])
def test_csv_empty_file_is_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "d.csv", text)
    with pytest.raises(DataError, match=re.escape(f"{path}: empty file")):
        load_csv(path)


def test_csv_header_only_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="a header row but no data rows"):
        load_csv(write(tmp_path / "d.csv", "a,b,label\n"))


def test_csv_single_column_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs at least two columns"):
        load_csv(write(tmp_path / "d.csv", "1\n2\n"))


def test_csv_quoted_numbers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="line 1, column 1: '\"1\"' is not a number"):
        load_csv(write(tmp_path / "d.csv", '"1",0\n'))


def test_csv_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absent.csv"
    with pytest.raises(DataError, match=re.escape(f"{path}: no such file")):
        load_csv(path)


def test_csv_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dir.csv"
    path.mkdir()
    with pytest.raises(DataError, match=r"dir\.csv: cannot read"):
        load_csv(path)


def test_csv_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(b"caf\xe9,label\n1,0\n")
    with pytest.raises(DataError, match=r"latin\.csv: not UTF-8 text"):
        load_csv(path)


# ---------------------------------------------------------------------------
# load_file
# ---------------------------------------------------------------------------


def test_load_file_dispatches_on_suffix(tmp_path: Path) -> None:
    npz = tmp_path / "a.npz"
    np.savez(npz, x=np.zeros((2, 1)), y=np.array([0, 1]))
    csv = write(tmp_path / "b.CSV", "1,0\n2,1\n3,1\n")
    assert len(load_file(npz)) == 2
    assert len(load_file(str(csv))) == 3


@pytest.mark.parametrize("name", ["data.txt", "data", "data.npy"])
def test_load_file_unknown_suffix_is_refused(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "1,0\n")
    with pytest.raises(DataError, match="unknown file type"):
        load_file(path)


def test_load_file_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_file(tmp_path / "absent.npz")
