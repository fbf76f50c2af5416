// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {AccessControlDefaultAdminRules} from "@openzeppelin/contracts/access/extensions/AccessControlDefaultAdminRules.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {ERC20Burnable} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Burnable.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/// @title SNO bonds of validators and workers
/// @notice Every account has a `staked` balance and one unbonding entry. Stake leaves only through
/// an unbonding delay with an enforced floor, and slashing reaches the unbonding entry too, so a
/// misbehaving account cannot escape a slash by unbonding first.
/// @dev The validator set is an array plus a 1-based index mapping: O(1) join and leave, bounded by
/// MAX_VALIDATORS so the settlement signature loop stays cheap. Every change of the set bumps `epoch`,
/// which settlement messages carry, so signatures made under an older set go stale.
contract Staking is AccessControlDefaultAdminRules, ReentrancyGuard {
    using SafeERC20 for IERC20;

    /// @notice Shortest unbonding delay the admin can set; protects against a near-zero delay that
    /// would let stake leave before a slash can be signed (Galxe-style audit finding).
    uint64 public constant MIN_UNBONDING_FLOOR = 1 days;
    /// @notice Upper bound of the validator set, which bounds the gas of every quorum check.
    uint256 public constant MAX_VALIDATORS = 64;

    struct Unbonding {
        uint256 amount;
        uint64 releaseAt;
    }

    IERC20 public immutable token;
    /// @notice The account that may bind the slasher (the deployment script's key).
    address public immutable deployer;
    /// @notice The settlement contract; zero until bound.
    address public slasher;

    uint256 public minStake;
    uint64 public unbondingDelay;
    uint16 public quorumBps;
    /// @notice Version of the validator set; bumped on every join or leave.
    uint64 public epoch;

    mapping(address account => uint256) private _staked;
    mapping(address account => Unbonding) private _unbonding;
    address[] private _validators;
    /// @dev Position in `_validators` plus one; zero means "not a validator".
    mapping(address account => uint256) private _validatorIndex;

    event Staked(address indexed account, uint256 amount, uint256 staked);
    event UnbondRequested(address indexed account, uint256 amount, uint256 unbonding, uint64 releaseAt);
    event Withdrawn(address indexed account, uint256 amount);
    event ValidatorJoined(address indexed validator, uint64 epoch);
    event ValidatorLeft(address indexed validator, uint64 epoch);
    event Slashed(address indexed offender, uint256 taken, address indexed recipient);
    event SlasherBound(address indexed slasher);
    event MinStakeSet(uint256 oldValue, uint256 newValue);
    event UnbondingDelaySet(uint64 oldValue, uint64 newValue);
    event QuorumBpsSet(uint16 oldValue, uint16 newValue);

    error ZeroAmount();
    error ZeroAddress();
    error InsufficientStake(uint256 have, uint256 need);
    error AlreadyValidator(address account);
    error NotAValidator(address account);
    error ValidatorSetFull();
    error StillUnbonding(uint64 releaseAt);
    error NothingToWithdraw();
    error UnbondingBelowFloor(uint64 delay, uint64 floor);
    error BadQuorum(uint16 bps);
    error NotSlasher(address caller);
    error SlasherAlreadyBound();
    error NotDeployer();

    /// @param adminDelay delay of the two-step DEFAULT_ADMIN_ROLE transfer (AccessControlDefaultAdminRules).
    /// @param quorumBps_ share of the validator set that must sign, in basis points, in (5000, 10000]:
    /// more than half, so two disjoint quorums cannot both exist.
    constructor(
        IERC20 token_,
        address admin,
        uint48 adminDelay,
        uint256 minStake_,
        uint64 unbondingDelay_,
        uint16 quorumBps_
    ) AccessControlDefaultAdminRules(adminDelay, admin) {
        if (address(token_) == address(0)) revert ZeroAddress();
        if (minStake_ == 0) revert ZeroAmount();
        _checkUnbondingDelay(unbondingDelay_);
        _checkQuorumBps(quorumBps_);
        token = token_;
        deployer = msg.sender;
        minStake = minStake_;
        unbondingDelay = unbondingDelay_;
        quorumBps = quorumBps_;
    }

    // ---------------------------------------------------------------- binding

    /// @notice Binds the settlement contract as the only slasher; once only, like SNOToken.bindMinter.
    function bindSlasher(address s) external {
        if (msg.sender != deployer) revert NotDeployer();
        if (slasher != address(0)) revert SlasherAlreadyBound();
        if (s == address(0)) revert ZeroAddress();
        slasher = s;
        emit SlasherBound(s);
    }

    // ---------------------------------------------------------------- bonding

    /// @notice Bonds `amount` SNO from the caller (needs a prior approve).
    function stake(uint256 amount) external {
        _stake(amount);
    }

    /// @notice Bonds with an ERC-2612 permit. The permit is tried and its failure ignored, because a
    /// front-runner may already have submitted it (the allowance then exists); tokens are only ever
    /// pulled from msg.sender, so someone else's permit cannot be used to move their funds.
    function stakeWithPermit(uint256 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s) external {
        try IERC20Permit(address(token)).permit(msg.sender, address(this), amount, deadline, v, r, s) {} catch {}
        _stake(amount);
    }

    function _stake(uint256 amount) private {
        if (amount == 0) revert ZeroAmount();
        uint256 newStaked = _staked[msg.sender] + amount;
        _staked[msg.sender] = newStaked;
        emit Staked(msg.sender, amount, newStaked);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice Moves `amount` from staked into the unbonding entry. A later request restarts the clock
    /// for the whole entry, so splitting requests cannot shorten the delay of any part. A validator left
    /// below minStake leaves the set.
    function requestUnbond(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        uint256 have = _staked[msg.sender];
        if (amount > have) revert InsufficientStake(have, amount);
        _staked[msg.sender] = have - amount;
        Unbonding storage u = _unbonding[msg.sender];
        u.amount += amount;
        u.releaseAt = uint64(block.timestamp) + unbondingDelay;
        emit UnbondRequested(msg.sender, amount, u.amount, u.releaseAt);
        _dropIfUnderStaked(msg.sender);
    }

    /// @notice Pays out the unbonding entry once its delay has passed.
    function withdraw() external nonReentrant {
        Unbonding memory u = _unbonding[msg.sender];
        if (u.amount == 0) revert NothingToWithdraw();
        if (block.timestamp < u.releaseAt) revert StillUnbonding(u.releaseAt);
        delete _unbonding[msg.sender];
        emit Withdrawn(msg.sender, u.amount);
        token.safeTransfer(msg.sender, u.amount);
    }

    // ---------------------------------------------------------------- validator set

    /// @notice Joins the validator set; needs at least minStake bonded.
    function joinValidators() external {
        address v = msg.sender;
        if (_validatorIndex[v] != 0) revert AlreadyValidator(v);
        uint256 have = _staked[v];
        if (have < minStake) revert InsufficientStake(have, minStake);
        if (_validators.length >= MAX_VALIDATORS) revert ValidatorSetFull();
        _validators.push(v);
        _validatorIndex[v] = _validators.length;
        uint64 e = ++epoch;
        emit ValidatorJoined(v, e);
    }

    /// @notice Leaves the validator set; the stake stays bonded until requestUnbond.
    function leaveValidators() external {
        if (_validatorIndex[msg.sender] == 0) revert NotAValidator(msg.sender);
        _removeValidator(msg.sender);
    }

    function _dropIfUnderStaked(address account) private {
        if (_validatorIndex[account] != 0 && _staked[account] < minStake) _removeValidator(account);
    }

    /// @dev Swap-and-pop: O(1), order of the set not preserved (the spec does not require it).
    function _removeValidator(address v) private {
        uint256 index = _validatorIndex[v];
        uint256 last = _validators.length;
        if (index != last) {
            address moved = _validators[last - 1];
            _validators[index - 1] = moved;
            _validatorIndex[moved] = index;
        }
        _validators.pop();
        delete _validatorIndex[v];
        uint64 e = ++epoch;
        emit ValidatorLeft(v, e);
    }

    // ---------------------------------------------------------------- slashing

    /// @notice Takes up to `amount` from `offender`: staked first, then the unbonding entry, so
    /// unbonding does not escape. Sends it to `recipient`, or burns it when recipient is zero.
    /// @return taken what was actually taken (less than `amount` if the offender has less).
    function slash(address offender, uint256 amount, address recipient) external nonReentrant returns (uint256 taken) {
        if (msg.sender != slasher) revert NotSlasher(msg.sender);
        if (amount == 0) revert ZeroAmount();
        uint256 have = _staked[offender];
        taken = amount < have ? amount : have;
        _staked[offender] = have - taken;
        if (taken < amount) {
            Unbonding storage u = _unbonding[offender];
            uint256 rest = amount - taken;
            uint256 fromUnbonding = rest < u.amount ? rest : u.amount;
            u.amount -= fromUnbonding;
            taken += fromUnbonding;
        }
        _dropIfUnderStaked(offender);
        emit Slashed(offender, taken, recipient);
        if (taken != 0) {
            if (recipient == address(0)) ERC20Burnable(address(token)).burn(taken);
            else token.safeTransfer(recipient, taken);
        }
    }

    // ---------------------------------------------------------------- views

    function isValidator(address account) external view returns (bool) {
        return _validatorIndex[account] != 0;
    }

    /// @notice The current validator set, in no particular order.
    function validators() external view returns (address[] memory) {
        return _validators;
    }

    function validatorCount() external view returns (uint256) {
        return _validators.length;
    }

    /// @notice Signatures a settlement or slash needs: ceil(validatorCount * quorumBps / 10000), at least 1.
    function quorum() external view returns (uint256) {
        uint256 q = (_validators.length * quorumBps + 9999) / 10000;
        return q == 0 ? 1 : q;
    }

    function stakeOf(address account) external view returns (uint256 staked, uint256 unbonding, uint64 releaseAt) {
        Unbonding memory u = _unbonding[account];
        return (_staked[account], u.amount, u.releaseAt);
    }

    // ---------------------------------------------------------------- admin

    /// @notice Sets the bond a validator needs. Validators now below it leave the set (each leave bumps
    /// the epoch as any leave does), so every member of the set always holds at least minStake.
    function setMinStake(uint256 newMinStake) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (newMinStake == 0) revert ZeroAmount();
        emit MinStakeSet(minStake, newMinStake);
        minStake = newMinStake;
        // Backwards, because a removal moves the last element into the removed slot.
        for (uint256 i = _validators.length; i > 0; --i) {
            _dropIfUnderStaked(_validators[i - 1]);
        }
    }

    /// @notice Sets the unbonding delay for future requests; entries already queued keep their releaseAt.
    function setUnbondingDelay(uint64 newDelay) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _checkUnbondingDelay(newDelay);
        emit UnbondingDelaySet(unbondingDelay, newDelay);
        unbondingDelay = newDelay;
    }

    function setQuorumBps(uint16 newBps) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _checkQuorumBps(newBps);
        emit QuorumBpsSet(quorumBps, newBps);
        quorumBps = newBps;
    }

    function _checkUnbondingDelay(uint64 delay) private pure {
        if (delay < MIN_UNBONDING_FLOOR) revert UnbondingBelowFloor(delay, MIN_UNBONDING_FLOOR);
    }

    function _checkQuorumBps(uint16 bps) private pure {
        if (bps <= 5000 || bps > 10000) revert BadQuorum(bps);
    }
}
