"""``read_npy_uint8``, the part maps' .npy reader: what numpy's own writers produce reads back exactly (format
versions 1, 2 and 3), and every other input, hostile ones included, is refused with a ValueError that
``decode_sample`` turns into a ShardFormatError naming the sample. Nothing is ever unpickled or evaluated."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest

from pipeline.data.shards import ShardFormatError, decode_sample, read_npy_float16, read_npy_uint8

UNPICKLED = []


def record_unpickling() -> str:
    UNPICKLED.append(True)
    return "ran"


class Trap:
    """An object whose unpickling runs code (the pickle of an object array carries it)."""

    def __reduce__(self):
        return record_unpickling, ()


def npy(arr: np.ndarray, version: tuple[int, int] | None = None, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version, allow_pickle=allow_pickle)
    return buf.getvalue()


def with_header(text: str, data: bytes = b"", version: int = 1) -> bytes:
    """A .npy file with ``text`` as its header (padded and terminated as numpy does), then ``data``."""
    start = 10 if version == 1 else 12
    header = text.encode() + b" " * (-(start + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY" + bytes([version, 0]) + len(header).to_bytes(start - 8, "little") + header + data


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
@pytest.mark.parametrize("shape", [(4, 4), (3, 7), (5,), (0,), (2, 0)])
def test_what_numpy_writes_reads_back_exactly(version, shape):
    arr = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    data = npy(arr, version)
    assert data[6] == version[0]  # numpy wrote the format asked for
    out = read_npy_uint8(data)
    assert out.dtype == np.uint8 and out.shape == shape and np.array_equal(out, arr)
    assert out.flags.writeable and out.flags.c_contiguous  # a copy: not a view of the shard's bytes
    assert np.array_equal(out, np.load(io.BytesIO(data), allow_pickle=False))


def test_np_save_output_is_what_the_part_shards_hold():
    buf = io.BytesIO()
    np.save(buf, np.arange(16, dtype=np.uint8).reshape(4, 4), allow_pickle=False)
    assert read_npy_uint8(buf.getvalue()).tolist() == np.arange(16).reshape(4, 4).tolist()


def test_an_object_array_is_refused_without_being_unpickled():
    data = npy(np.array([Trap(), Trap()], dtype=object), allow_pickle=True)
    assert b"record_unpickling" in data  # the payload is there: loading it would run the function
    before = len(UNPICKLED)
    pickle.loads(pickle.dumps(Trap()))  # the trap works (this test's own unpickling)...
    assert len(UNPICKLED) == before + 1
    with pytest.raises(ValueError, match=r"header b\"\{'descr': '\|O'.* is not that of a 1-D or 2-D C-order uint8"):
        read_npy_uint8(data)
    assert len(UNPICKLED) == before + 1  # ...but the reader never ran it


FULL = np.arange(12, dtype=np.uint8).reshape(3, 4)
GOOD = npy(FULL)
GOOD_V2 = npy(FULL, (2, 0))


@pytest.mark.parametrize("data, message", [
    (npy(FULL.astype(np.int16)), r"'descr': '<i2'.* is not that of a 1-D or 2-D C-order uint8 array"),
    (npy(FULL.astype(">u2")), r"'descr': '>u2'.* is not that of"),
    (npy(FULL.astype(np.int8)), r"'descr': '\|i1'.* is not that of"),
    (npy(FULL.astype(bool)), r"'descr': '\|b1'.* is not that of"),
    (npy(FULL.astype(np.float32)), r"'descr': '<f4'.* is not that of"),
    (npy(np.asfortranarray(FULL)), r"'fortran_order': True.* is not that of"),
    (npy(np.zeros((2, 2, 2), np.uint8)), r"'shape': \(2, 2, 2\).* is not that of"),
    (npy(np.array(7, np.uint8)), r"'shape': \(\).* is not that of"),
    (with_header("{'descr': '|u1', 'fortran_order': False, 'shape': (-4,), }", b"abcd"), r"\(-4,\).* is not that of"),
    (with_header("{'descr': '|u1', 'fortran_order': False, 'shape': (10000000000000000000000, 2), }"),
     r"0 data bytes for shape \(10000000000000000000000, 2\)"),
    (with_header("[1, 2, 3]", b"abc"), r"header b'\[1, 2, 3\]' is not that of"),
    (with_header("__import__('os').system('touch pwned')"), r"header b\"__import__.* is not that of"),
    (with_header("{'shape': (4,), 'descr': '|u1', 'fortran_order': False, }", b"abcd"), "is not that of"),
    (GOOD[:-1], r"11 data bytes for shape \(3, 4\)"),
    (GOOD + b"\x00", r"13 data bytes for shape \(3, 4\)"),
    (GOOD_V2[:-1], r"11 data bytes for shape \(3, 4\)"),
    (GOOD[:40], r"truncated: the header runs to byte 128 of 40"),
    (GOOD[:8] + (len(GOOD)).to_bytes(2, "little") + GOOD[10:], rf"truncated: the header runs to byte {len(GOOD) + 10} of"),
    (GOOD_V2[:8] + (2**32 - 1).to_bytes(4, "little") + GOOD_V2[12:], r"truncated: the header runs to byte 4294967307 of"),
    (GOOD_V2[:11], r"truncated: the header runs to byte \d+ of 11"),
    (GOOD[:9], "not a .npy file"),
    (b"", "not a .npy file"),
    (b"PK\x03\x04" + GOOD[4:], "not a .npy file"),
    (GOOD[:6] + b"\x04" + GOOD[7:], "unknown .npy format version 4"),
    (GOOD[:6] + b"\x00" + GOOD[7:], "unknown .npy format version 0"),
])  # fmt: skip
def test_anything_else_is_refused(data, message):
    with pytest.raises(ValueError, match=message):
        read_npy_uint8(data)


def test_the_error_names_the_sample_and_its_shard():
    sample = {"__key__": "train00007", "__url__": "part_shards/train/train-000003.tar", "png": b"\x89PNG", "cls": b"1",
              "json": b"{}", "parts.npy": npy(np.array([Trap()], dtype=object), allow_pickle=True)}  # fmt: skip
    before = len(UNPICKLED)
    with pytest.raises(ShardFormatError, match=r"^sample 'train00007' in part_shards/train/train-000003\.tar: malformed "
                                               r"parts\.npy \(header .*'\|O'"):  # fmt: skip
        decode_sample(sample)
    assert len(UNPICKLED) == before
    sample["parts.npy"] = GOOD
    assert np.array_equal(decode_sample(sample)["parts"], FULL)


# ``read_npy_float16``, the attention maps' reader: the same header parser, for 2-D little-endian float16 only


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
@pytest.mark.parametrize("shape", [(4, 4), (3, 7), (1, 1), (0, 5)])
def test_float16_what_numpy_writes_reads_back_exactly(version, shape):
    arr = np.random.default_rng(sum(shape)).random(shape).astype(np.float16)
    data = npy(arr, version)
    out = read_npy_float16(data)
    assert out.dtype == np.float16 and out.shape == shape and np.array_equal(out, arr)
    assert out.flags.writeable and out.flags.c_contiguous and out.dtype.isnative  # a copy, in native order
    assert np.array_equal(out, np.load(io.BytesIO(data), allow_pickle=False))


F16 = (np.arange(12, dtype=np.float16).reshape(3, 4) + 1) / 64
GOOD16 = npy(F16)


def nonfinite(value: float) -> bytes:
    arr = F16.copy()
    arr[1, 2] = value
    return npy(arr)


@pytest.mark.parametrize("data, message", [
    (npy(F16.astype(">f2")), r"'descr': '>f2'.* is not that of a 2-D C-order little-endian float16 array"),
    (npy(F16.astype(np.float32)), r"'descr': '<f4'.* is not that of"),
    (npy(F16.astype(np.uint8)), r"'descr': '\|u1'.* is not that of"),
    (npy(np.asfortranarray(F16)), r"'fortran_order': True.* is not that of"),
    (npy(np.zeros((2, 2, 2), np.float16)), r"'shape': \(2, 2, 2\).* is not that of"),
    (npy(np.zeros(4, np.float16)), r"'shape': \(4,\).* is not that of"),
    (npy(np.array(np.float16(1))), r"'shape': \(\).* is not that of"),
    (nonfinite(np.nan), r"1 non-finite value\(s\), the first nan at \(1, 2\)"),
    (nonfinite(np.inf), r"1 non-finite value\(s\), the first inf at \(1, 2\)"),
    (nonfinite(-np.inf), r"the first -inf at \(1, 2\)"),
    (GOOD16[:-1], r"23 data bytes for shape \(3, 4\)"),
    (GOOD16[:-2], r"22 data bytes for shape \(3, 4\)"),
    (GOOD16 + b"\x00\x00", r"26 data bytes for shape \(3, 4\)"),
    (GOOD16[:40], r"truncated: the header runs to byte 128 of 40"),
    (with_header("{'descr': '<f2', 'fortran_order': False, 'shape': (-2, 2), }", b"abcdefgh"),
     r"\(-2, 2\).* is not that of"),
    (with_header("__import__('os').system('touch pwned')"), r"header b\"__import__.* is not that of"),
    (GOOD16[:6] + b"\x04" + GOOD16[7:], "unknown .npy format version 4"),
    (b"", "not a .npy file"),
])  # fmt: skip
def test_float16_anything_else_is_refused(data, message):
    with pytest.raises(ValueError, match=message):
        read_npy_float16(data)


def test_float16_an_object_array_is_refused_without_being_unpickled():
    data = npy(np.array([Trap(), Trap()], dtype=object), allow_pickle=True)
    before = len(UNPICKLED)
    with pytest.raises(ValueError, match=r"'\|O'.* is not that of a 2-D C-order little-endian float16 array"):
        read_npy_float16(data)
    assert len(UNPICKLED) == before


def test_a_malformed_attention_map_is_named_with_its_sample():
    sample = {"__key__": "train00007", "__url__": "part_shards/train/train-000003.tar", "png": b"\x89PNG", "cls": b"1",
              "json": b"{}", "parts.npy": GOOD, "attn.npy": nonfinite(np.nan)}  # fmt: skip
    with pytest.raises(ShardFormatError, match=r"^sample 'train00007' in part_shards/train/train-000003\.tar: malformed "
                                               r"attn\.npy \(1 non-finite value"):  # fmt: skip
        decode_sample(sample)
    sample["attn.npy"] = GOOD16
    out = decode_sample(sample)
    assert np.array_equal(out["attention"], F16) and np.array_equal(out["parts"], FULL)
    del sample["attn.npy"]
    assert "attention" not in decode_sample(sample)  # old part shards still decode
