"""history.jsonl: strict JSON lines, checksums, non-finite floats, torn lines, local, fsspec."""

from __future__ import annotations

import json
import math
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from haltpoint.store.hashing import hash_bytes
from haltpoint.store.history import (
    HISTORY_NAME,
    append_history,
    decode_record,
    encode_record,
    read_history,
)
from haltpoint.store.storage import FsspecStorage, LocalStorage, Storage


@pytest.fixture(params=["local", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        yield LocalStorage(tmp_path / "run")
    else:
        mem = FsspecStorage(f"memory://history-{uuid.uuid4().hex}")
        yield mem
        mem.rmtree("")


def raw(storage: Storage) -> bytes:
    return storage.read_bytes(HISTORY_NAME)


def write_raw(storage: Storage, data: bytes) -> None:
    storage.publish(HISTORY_NAME, data)


def test_absent_history_is_empty(storage: Storage) -> None:
    assert read_history(storage) == []


def test_round_trip_in_order(storage: Storage) -> None:
    records = [
        {"step": i, "time": 1700000000.5 + i, "metrics": {"loss": 1.0 / (i + 1)}, "stop": False}
        for i in range(5)
    ]
    for record in records:
        append_history(storage, record)
    assert read_history(storage) == records
    assert raw(storage).count(b"\n") == 5


def test_non_finite_floats_are_strict_json_and_come_back(storage: Storage) -> None:
    record = {
        "step": 1,
        "metrics": {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "ok": 0.25},
        "list": [math.nan, 1, (2.0, math.inf)],
        "none": None,
    }
    append_history(storage, record)
    line = raw(storage).decode()
    # strict JSON: a parser refusing NaN/Infinity tokens reads it
    strict = json.loads(line, parse_constant=lambda token: pytest.fail(f"non-strict {token}"))
    assert strict["metrics"] == {"nan": "NaN", "inf": "Infinity", "ninf": "-Infinity", "ok": 0.25}
    (back,) = read_history(storage)
    assert math.isnan(back["metrics"]["nan"])
    assert back["metrics"]["inf"] == math.inf
    assert back["metrics"]["ninf"] == -math.inf
    assert back["metrics"]["ok"] == 0.25
    assert math.isnan(back["list"][0])
    assert back["list"][1:] == [1, [2.0, math.inf]]
    assert back["none"] is None


def test_int_stays_int_and_scalars_are_unwrapped() -> None:
    line = encode_record(
        {"step": np.int64(7), "a": np.float32(0.5), "t": torch.tensor(2.5), "b": np.bool_(True)}
    )
    assert decode_record(line) == {"step": 7, "a": 0.5, "t": 2.5, "b": True}
    assert isinstance(decode_record(line)["step"], int)


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"x": object()}, r"value at record\['x'\] is a object .*allowed: None, bool, int"),
        ({"m": {"t": torch.ones(3)}}, r"value at record\['m'\]\['t'\] is a Tensor"),
        ({"m": {1: 0.5}}, r"key 1 at record\['m'\] is a int; keys must be strings"),
        ({"l": [1, {2}]}, r"value at record\['l'\]\[1\] is a set"),
    ],
)
def test_unrepresentable_values_are_refused(
    storage: Storage, record: dict[str, object], match: str
) -> None:
    with pytest.raises(TypeError, match=match):
        append_history(storage, record)
    assert read_history(storage) == []


def test_record_must_be_a_mapping() -> None:
    with pytest.raises(TypeError, match=r"record must be a mapping, got list"):
        encode_record([1, 2])  # type: ignore[arg-type]


def test_decode_refuses_non_objects() -> None:
    with pytest.raises(ValueError, match=r"must hold a JSON object, got list"):
        decode_record(b"[1, 2]")


def test_torn_last_line_is_ignored_silently(storage: Storage) -> None:
    append_history(storage, {"step": 1})
    append_history(storage, {"step": 2})
    write_raw(storage, raw(storage) + b'{"step": 3, "metr')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_history(storage) == [{"step": 1}, {"step": 2}]


def test_an_invalid_last_line_with_its_newline_is_damage_not_a_tear(storage: Storage) -> None:
    write_raw(storage, b'{"step": 1}\nnot json\n\n')  # an append writes line and newline at once
    with pytest.warns(UserWarning, match=r"line 2 is not a valid record"):
        assert read_history(storage) == [{"step": 1}]


def test_append_after_torn_line_drops_the_fragment(storage: Storage) -> None:
    append_history(storage, {"step": 1})
    write_raw(storage, raw(storage) + b'{"step": 2, "los')  # crash mid-append
    append_history(storage, {"step": 3})
    assert raw(storage) == encode_record({"step": 1}) + encode_record({"step": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_history(storage) == [{"step": 1}, {"step": 3}]


def test_append_after_a_torn_first_line(storage: Storage) -> None:
    write_raw(storage, b'{"step": 0, "lo')
    append_history(storage, {"step": 1})
    assert raw(storage) == encode_record({"step": 1})


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(encode_record({"step": 2})[:-1], id="a-complete-record"),
        pytest.param(b"written by another tool", id="foreign-text"),
        pytest.param(b'{"step": 2, "pad": "' + b"x" * (1 << 20), id="longer-than-any-tear"),
    ],
)
def test_append_keeps_any_text_after_the_last_newline_but_a_torn_record(
    storage: Storage, tail: bytes
) -> None:
    """Only a fragment that a torn append of haltpoint's could have left is dropped: a whole
    record, another tool's text or a line too long to be a tear stays byte for byte, and the
    new record goes on a fresh line after it (a history of one line without its newline was
    cut to 0 bytes)."""
    write_raw(storage, encode_record({"step": 1}) + tail)
    append_history(storage, {"step": 3})
    assert raw(storage) == encode_record({"step": 1}) + tail + b"\n" + encode_record({"step": 3})


def test_append_keeps_a_history_of_one_line_without_its_newline(storage: Storage) -> None:
    write_raw(storage, encode_record({"step": 1})[:-1])
    append_history(storage, {"step": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_history(storage) == [{"step": 1}, {"step": 2}]


def test_invalid_middle_lines_warn_with_their_numbers(storage: Storage) -> None:
    write_raw(storage, b'{"step": 1}\n[1]\n\n\xff\xfe\n{"step": 5}\n')
    with pytest.warns(UserWarning) as caught:
        assert read_history(storage) == [{"step": 1}, {"step": 5}]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "line 2 is not a valid record" in messages[0]
    assert "line 4 is not a valid record" in messages[1]
    assert "skipped it" in messages[0]


def test_a_line_nested_too_deep_for_json_is_skipped_with_a_warning(storage: Storage) -> None:
    deep = b'{"step": 2, "metrics": {"loss": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    write_raw(storage, b'{"step": 1}\n' + deep + b'\n{"step": 3}\n')
    with pytest.warns(UserWarning, match=r"line 2 is not a valid record \(it nests containers"):
        assert read_history(storage) == [{"step": 1}, {"step": 3}]


def test_lenient_reader_accepts_bare_nan_tokens(storage: Storage) -> None:
    write_raw(storage, b'{"loss": NaN}\n')
    (record,) = read_history(storage)
    assert math.isnan(record["loss"])


def test_local_file_is_where_expected(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    append_history(storage, {"step": 0})
    assert (tmp_path / "history.jsonl").read_bytes() == encode_record({"step": 0})


# -- every line carries its checksum ------------------------------------------------------


def test_each_line_ends_with_the_checksum_of_the_rest() -> None:
    line = encode_record({"step": 3, "metrics": {"val_loss": 0.25}})
    body = json.loads(line)
    recorded = body.pop("checksum")
    assert line.startswith(b'{"step":3,"metrics":{"val_loss":0.25},"checksum":"')
    assert recorded == hash_bytes(json.dumps(body, separators=(",", ":")).encode())


def test_the_checksum_key_is_reserved() -> None:
    with pytest.raises(ValueError, match=r"must not use the reserved key 'checksum'"):
        encode_record({"step": 1, "checksum": "x"})


def test_a_flipped_bit_skips_that_line_only_with_one_warning(storage: Storage) -> None:
    for step, loss in enumerate([0.5, 0.25, 0.125]):
        append_history(storage, {"step": step, "metrics": {"val_loss": loss}})
    lines = raw(storage).split(b"\n")
    at = lines[1].index(b"0.25") + 3
    lines[1] = lines[1][:at] + bytes([lines[1][at] ^ 0x01]) + lines[1][at + 1 :]  # 0.25 -> 0.24
    json.loads(lines[1])  # still valid JSON: only the checksum tells
    write_raw(storage, b"\n".join(lines))
    with pytest.warns(UserWarning) as caught:
        records = read_history(storage)
    assert [r["step"] for r in records] == [0, 2]
    (message,) = [str(w.message) for w in caught]
    assert "line 2 is skipped: its checksum does not match its content (damaged)" in message


def test_a_damaged_last_line_is_not_taken_for_a_torn_one(storage: Storage) -> None:
    append_history(storage, {"step": 1, "metrics": {"val_loss": 0.5}})
    append_history(storage, {"step": 2, "metrics": {"val_loss": 0.4}})
    write_raw(storage, raw(storage).replace(b'"val_loss":0.4', b'"val_loss":0.5'))
    with pytest.warns(UserWarning, match=r"line 2 is skipped: its checksum does not match"):
        assert [r["step"] for r in read_history(storage)] == [1]


def test_a_flip_in_the_checksum_key_of_a_later_line_is_damage(storage: Storage) -> None:
    for step in range(3):
        append_history(storage, {"step": step})
    data = raw(storage)
    third = data.rindex(b'"checksum"')
    write_raw(storage, data[:third] + b'"checksuo"' + data[third + 10 :])
    with pytest.warns(UserWarning, match=r"line 3 is skipped: it has no checksum, although"):
        assert [r["step"] for r in read_history(storage)] == [0, 1]


def test_old_lines_without_checksums_still_read(storage: Storage) -> None:
    write_raw(storage, b'{"step":1,"metrics":{"loss":"NaN"}}\n{"step":2}\n')
    append_history(storage, {"step": 3})  # an old run resumed by this haltpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = read_history(storage)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert math.isnan(records[0]["metrics"]["loss"])
    assert "checksum" not in records[2]
