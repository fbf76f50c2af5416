// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Burnable} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Burnable.sol";

import {Settlement} from "../src/Settlement.sol";

/// @title Test-only token that re-enters Settlement.claim from inside `transfer`
/// @notice Deployed in place of SNOToken (same `mint(address,uint256)` + ERC20 + burn interface) to
/// prove claim is not reentrant: once armed, the next transfer calls claim with the armed arguments and
/// bubbles up whatever that call reverts with (ReentrancyGuardReentrantCall when the guard holds).
/// Anyone may mint. Never deploy outside tests.
contract ReentrantToken is ERC20, ERC20Burnable {
    struct Call {
        Settlement target;
        uint256 jobId;
        address worker;
        uint256 amount;
        int256 repDelta;
        bytes32[] proof;
    }

    Call private _call;
    bool public armed;
    /// @notice How many re-entries succeeded (stays 0 when the guard works).
    uint256 public reentries;

    event Armed(address indexed target, uint256 jobId, address worker);

    constructor() ERC20("Reentrant Test Token", "RTT") {}

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    /// @notice Sets the arguments of the claim the next transfer makes.
    function arm(
        Settlement target,
        uint256 jobId,
        address worker,
        uint256 amount,
        int256 repDelta,
        bytes32[] calldata proof
    ) external {
        _call = Call(target, jobId, worker, amount, repDelta, proof);
        armed = true;
        emit Armed(address(target), jobId, worker);
    }

    function transfer(address to, uint256 value) public override returns (bool) {
        bool ok = super.transfer(to, value);
        if (armed) {
            armed = false; // one re-entry attempt per arm
            Call memory c = _call;
            try c.target.claim(c.jobId, c.worker, c.amount, c.repDelta, c.proof) {
                reentries += 1;
            } catch (bytes memory reason) {
                assembly ("memory-safe") {
                    revert(add(reason, 0x20), mload(reason))
                }
            }
        }
        return ok;
    }
}
