"""Revert decoding: every custom error in the ABIs is a named class; each backend's surface decodes."""

from __future__ import annotations

import pytest
from eth_abi import abi
from eth_tester.exceptions import TransactionFailed
from eth_utils import keccak, to_checksum_address
from web3.exceptions import ContractCustomError, ContractLogicError, ContractPanicError

from tensorlink.chain import artifacts, errors

ADDR = to_checksum_address("0x" + "ab" * 20)


def _data(signature: str, types: list[str], values: list[object]) -> bytes:
    return keccak(text=signature)[:4] + abi.encode(types, values)


def test_every_abi_error_is_a_named_class() -> None:
    names = errors.error_names()
    for expected in ["NotValidatorSigner", "SignersNotAscending", "StaleEpoch", "NotMinter", "StillUnbonding"]:
        assert expected in names
        cls = getattr(errors, expected)
        assert issubclass(cls, errors.ContractRevert) and issubclass(cls, errors.ChainError)
        assert cls.__name__ == expected and cls.name == expected
    for name in artifacts.names():
        for entry in artifacts.load(name).abi:
            if entry["type"] == "error":
                assert entry["name"] in names
    with pytest.raises(AttributeError, match="no contract error named"):
        errors.NoSuchError  # noqa: B018


def test_decode_raw_data() -> None:
    exc = errors.decode(_data("NotValidatorSigner(address)", ["address"], [ADDR]))
    assert type(exc) is errors.NotValidatorSigner
    assert exc.args == (ADDR,) and exc.fields == {"signer": ADDR}
    assert str(exc) == f"NotValidatorSigner(signer='{ADDR}')"
    stale = errors.decode(_data("StaleEpoch(uint64,uint64)", ["uint64", "uint64"], [3, 4]))
    assert isinstance(stale, errors.StaleEpoch) and stale.fields == {"signed": 3, "current": 4}


def test_builtin_error_and_panic() -> None:
    exc = errors.decode(_data("Error(string)", ["string"], ["nope"]))
    assert type(exc) is errors.Error and exc.args == ("nope",)
    panic = errors.decode(_data("Panic(uint256)", ["uint256"], [0x11]))
    assert type(panic) is errors.Panic and panic.args == (0x11,)


def test_unknown_selector_and_garbage() -> None:
    exc = errors.decode(bytes.fromhex("deadbeef") + b"\x00" * 32)
    assert type(exc) is errors.ContractRevert and exc.selector == "deadbeef"
    assert "deadbeef" in str(exc)
    short = errors.decode(b"\x01\x02")
    assert type(short) is errors.ContractRevert
    truncated = errors.decode(keccak(text="StaleEpoch(uint64,uint64)")[:4] + b"\x00" * 10)
    assert type(truncated) is errors.ContractRevert  # wrong argument bytes: not guessed


def test_eth_tester_surface() -> None:
    raw = _data("InsufficientStake(uint256,uint256)", ["uint256", "uint256"], [1, 2])
    wrapped = TransactionFailed(f"execution reverted: {raw!r}")  # what web3's tester provider raises
    exc = errors.from_exception(wrapped)
    assert isinstance(exc, errors.InsufficientStake) and exc.args == (1, 2)
    assert isinstance(errors.from_exception(TransactionFailed(raw)), errors.InsufficientStake)
    # a quote or backslash inside the bytes survives the repr round trip
    tricky = _data("Error(string)", ["string"], ['it\'s \\ "odd"\n'])
    again = errors.from_exception(TransactionFailed(f"execution reverted: {tricky!r}"))
    assert isinstance(again, errors.Error) and again.args == ('it\'s \\ "odd"\n',)
    reason = errors.from_exception(TransactionFailed("execution reverted: plain words"))
    assert isinstance(reason, errors.Error) and reason.args == ("plain words",)


def test_json_rpc_surfaces() -> None:
    raw = _data("NotMinter(address)", ["address"], [ADDR])
    custom = errors.from_exception(ContractCustomError("0x" + raw.hex(), data="0x" + raw.hex()))
    assert isinstance(custom, errors.NotMinter) and custom.args == (ADDR,)
    panic_data = "0x" + _data("Panic(uint256)", ["uint256"], [0x11]).hex()
    assert isinstance(errors.from_exception(ContractPanicError("overflow", data=panic_data)), errors.Panic)
    nested = errors.from_exception(ContractLogicError("x", data={"data": "0x" + raw.hex()}))
    assert isinstance(nested, errors.NotMinter)
    assert errors.from_exception(ContractLogicError("no data", data="no data")) is None
    assert errors.from_exception(ValueError("not a revert")) is None


def test_missing_artifact_names_the_build_command(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    with pytest.raises(artifacts.ArtifactMissing, match="make contracts"):
        artifacts.load("NoSuchContract")
    with pytest.raises(ValueError):
        artifacts.load("../etc/passwd")
    monkeypatch.setattr(artifacts, "BUILD_DIR", tmp_path / "absent")
    with pytest.raises(artifacts.ArtifactMissing, match="make contracts"):
        artifacts.names()


def test_artifacts_load() -> None:
    art = artifacts.load("Settlement")
    assert art.contract_name == "Settlement" and art.bytecode.startswith("0x") and len(art.bytecode) > 1000
    assert "Settlement" in artifacts.names() and "test/ReentrantToken" in artifacts.names()
    assert artifacts.BUILD_DIR.resolve() == (artifacts.BUILD_DIR.parents[3] / "contracts" / "build").resolve()
