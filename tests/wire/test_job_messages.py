"""Job admission messages (JobRequest, JobPlan, StageAssign, StageAssigned): they round-trip at their
largest, and every way a peer can get one wrong is a WireError that names the field."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from tensorlink.wire import WireError
from tensorlink.wire.messages import (
    MAX_UNITS,
    JobPlan,
    JobRequest,
    StageAssign,
    StageAssigned,
    StagePlacement,
    UnitCost,
    decode_message,
    encode_message,
)

PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
LONGEST_PEER = "z" * 128
JOB = bytes(range(16))
REQUEST = {"kind": "job_request", "job": JOB, "owner": PEER, "workers": 2, "units": [[1.0, 2, 3]] * 4}
PLACEMENT = {"peer_id": PEER, "addrs": [], "stage": 1, "units": [2, 3], "memory_bytes": 5}
PLAN = {"kind": "job_plan", "job": JOB, "validator": PEER, "n_stages": 2, "unit_stage": [0, 0, 1, 1],
        "placements": [PLACEMENT]}  # fmt: skip
ASSIGN = {"kind": "stage_assign", "job": JOB, "owner": PEER, "validator": PEER, "stage": 0, "n_stages": 2,
          "memory_bytes": 1}  # fmt: skip


def raw(fields: dict[str, Any]) -> bytes:
    return msgspec.msgpack.encode(fields)


def test_largest_request_fits_its_cap_and_round_trips() -> None:
    """65536 units at their widest encodings: the 2 MiB cap holds the biggest request a user may send."""
    units = [UnitCost(flops=1e30, param_bytes=2**63 - 1, activation_bytes=2**63 - 1)] * MAX_UNITS
    request = JobRequest(
        job=JOB, owner=LONGEST_PEER, workers=64, units=units, private=True, optimizer_slots=4, device="cuda"
    )
    data = encode_message(request)
    assert len(data) <= JobRequest.max_bytes
    assert decode_message(data, expect=JobRequest) == request


def test_largest_plan_fits_its_cap_and_round_trips() -> None:
    placement = StagePlacement(
        peer_id=LONGEST_PEER, addrs=["/" + "x" * 511] * 16, stage=65, units=(65535, 65535), memory_bytes=2**63 - 1
    )
    unit_stage = [0] * (MAX_UNITS - 65) + list(range(1, 66))
    plan = JobPlan(job=JOB, validator=LONGEST_PEER, n_stages=66, unit_stage=unit_stage, placements=[placement] * 64)
    data = encode_message(plan)
    assert len(data) <= JobPlan.max_bytes
    assert decode_message(data, expect=JobPlan) == plan


def test_largest_assignment_fits_its_cap() -> None:
    assign = StageAssign(
        job=JOB, owner=LONGEST_PEER, validator=LONGEST_PEER, stage=65, n_stages=66, memory_bytes=2**63 - 1,
        prev=LONGEST_PEER, next=LONGEST_PEER,
    )  # fmt: skip
    assert decode_message(encode_message(assign)) == assign
    done = StageAssigned(job=JOB, stage=65)
    assert decode_message(encode_message(done)) == done


def test_defaults() -> None:
    request = decode_message(raw(REQUEST), expect=JobRequest)
    assert (request.private, request.optimizer_slots, request.device) == (False, 0, None)
    assign = decode_message(raw(ASSIGN), expect=StageAssign)
    assert assign.prev is None and assign.next is None


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({**REQUEST, "workers": 0}, r"Expected `int` >= 1 - at `\$\.workers`"),
        ({**REQUEST, "workers": 65}, r"Expected `int` <= 64 - at `\$\.workers`"),
        ({**REQUEST, "units": []}, r"Expected `array` of length >= 1 - at `\$\.units`"),
        ({**REQUEST, "units": [[1.0, 2, 3]] * (MAX_UNITS + 1)}, r"Expected `array` of length <= 65536"),
        ({**REQUEST, "units": [[-1.0, 2, 3]]}, r"Expected `float` >= 0\.0 - at `\$\.units\[0\]\[0\]`"),
        ({**REQUEST, "units": [[float("nan"), 2, 3]]}, r"Expected `float` >= 0\.0 - at `\$\.units\[0\]\[0\]`"),
        ({**REQUEST, "units": [[float("inf"), 2, 3]]}, r"Expected `float` <= 1e\+30 - at `\$\.units\[0\]\[0\]`"),
        ({**REQUEST, "units": [[1.0, -2, 3]]}, r"Expected `int` >= 0 - at `\$\.units\[0\]\[1\]`"),
        ({**REQUEST, "units": [[1.0, 2]]}, r"Expected `array` of at least length 3, got 2 - at `\$\.units\[0\]`"),
        ({**REQUEST, "units": [[1.0, 2, 3, 4]]}, r"Expected `array` of at most length 3, got 4 - at `\$\.units\[0\]`"),
        ({**REQUEST, "units": [{"flops": 1.0}]}, r"Expected `array`, got `object` - at `\$\.units\[0\]`"),
        ({**REQUEST, "optimizer_slots": 5}, r"Expected `int` <= 4 - at `\$\.optimizer_slots`"),
        ({**REQUEST, "device": "tpu"}, r"Invalid enum value 'tpu' - at `\$\.device`"),
        ({**REQUEST, "owner": "0OIl"}, r"Expected `str` matching .* - at `\$\.owner`"),
        ({**PLAN, "unit_stage": [0, 2, 1, 1]}, r"non-decreasing in steps of 0 or 1"),
        ({**PLAN, "unit_stage": [1, 1, 1, 1]}, r"start at stage 0 and end at stage n_stages - 1"),
        ({**PLAN, "unit_stage": [0, 0, 0, 0]}, r"start at stage 0 and end at stage n_stages - 1"),
        ({**PLAN, "n_stages": 67}, r"Expected `int` <= 66 - at `\$\.n_stages`"),
        ({**PLAN, "placements": [{**PLACEMENT, "stage": 2}]}, r"a placement names a stage past n_stages"),
        ({**PLAN, "placements": [{**PLACEMENT, "units": [3, 2]}]}, r"first <= last - at `\$\.placements\[0\]`"),
        (
            {**PLAN, "placements": [{**PLACEMENT, "units": [1]}]},
            r"Expected `array` of length 2, got 1 - at `\$\.placements\[0\]\.units`",
        ),
        ({**PLAN, "placements": [{**PLACEMENT, "admin": 1}]}, r"unknown field `admin`"),
        ({**PLAN, "placements": [PLACEMENT] * 65}, r"Expected `array` of length <= 64 - at `\$\.placements`"),
        ({**ASSIGN, "stage": 2}, r"stage must be below n_stages"),
        ({**ASSIGN, "prev": ""}, r"Expected `str` of length >= 1 - at `\$\.prev`"),
        ({**ASSIGN, "memory_bytes": -1}, r"Expected `int` >= 0 - at `\$\.memory_bytes`"),
        ({"kind": "stage_assigned", "job": JOB[:8], "stage": 0}, r"Expected `bytes` of length >= 16 - at `\$\.job`"),
    ],
)
def test_hostile_fields_are_named(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(WireError, match="malformed control message: .*" + match):
        decode_message(raw(fields))
