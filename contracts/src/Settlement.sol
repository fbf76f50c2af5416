// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {AccessControlDefaultAdminRules} from "@openzeppelin/contracts/access/extensions/AccessControlDefaultAdminRules.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {Math} from "@openzeppelin/contracts/utils/math/Math.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";

import {SNOToken} from "./SNOToken.sol";
import {Staking} from "./Staking.sol";

/// @title Job escrow, quorum-signed settlement, rewards, reputation and slashing
/// @notice A job owner escrows SNO; a quorum of staked validators signs one EIP-712 `Settle` message
/// per job, which pays the workers from the escrow plus freshly minted work rewards, either directly
/// (up to MAX_DIRECT_WORKERS) or through a Merkle root the workers claim against. Merkle rewards can be
/// claimed for `claimWindow` seconds after settlement; what is left then can be swept to the treasury.
/// @dev Replay protection is per job (status Open -> Settled) plus a deadline and the validator-set
/// epoch, never a global nonce, so concurrent jobs never invalidate each other's signatures.
contract Settlement is EIP712("TensorLink", "1"), AccessControlDefaultAdminRules, ReentrancyGuard {
    using SafeERC20 for SNOToken;

    /// @notice Above this many workers a settlement must use a reward root (gas per minted worker).
    uint256 public constant MAX_DIRECT_WORKERS = 8;
    /// @notice Bounds of jobTimeout: long enough for validators to settle before an owner can take the
    /// escrow back, short enough that escrow cannot be locked indefinitely.
    uint64 public constant MIN_JOB_TIMEOUT = 1 hours;
    uint64 public constant MAX_JOB_TIMEOUT = 365 days;
    /// @notice Bounds of claimWindow: long enough for every worker to claim, short enough that unclaimed
    /// Merkle rewards do not sit in this contract for good.
    uint64 public constant MIN_CLAIM_WINDOW = 7 days;
    uint64 public constant MAX_CLAIM_WINDOW = 730 days;

    uint8 public constant STATUS_NONE = 0;
    uint8 public constant STATUS_OPEN = 1;
    uint8 public constant STATUS_SETTLED = 2;
    uint8 public constant STATUS_RECLAIMED = 3;

    bytes32 public constant SETTLE_TYPEHASH = keccak256(
        "Settle(uint256 jobId,uint64 epoch,uint256 deadline,bytes32 proofRoot,uint256 payout,address[] workers,uint256[] work,int256[] reputation,bytes32 rewardRoot,uint256 totalWork)"
    );
    bytes32 public constant SLASH_TYPEHASH = keccak256(
        "Slash(address offender,uint256 amount,bytes32 evidence,uint256 nonce,uint64 epoch,uint256 deadline,int256 reputation)"
    );

    /// @notice EIP-712 `Settle`. Direct mode: rewardRoot == 0 and the three arrays name the workers.
    /// Merkle mode: rewardRoot != 0, arrays empty, workers claim (jobId, worker, amount, repDelta) leaves.
    struct Settle {
        uint256 jobId;
        uint64 epoch;
        uint256 deadline;
        bytes32 proofRoot;
        uint256 payout;
        address[] workers;
        uint256[] work;
        int256[] reputation;
        bytes32 rewardRoot;
        uint256 totalWork;
    }

    /// @notice EIP-712 `Slash`; `reputation` is the (non-positive) reputation change of the offender.
    struct Slash {
        address offender;
        uint256 amount;
        bytes32 evidence;
        uint256 nonce;
        uint64 epoch;
        uint256 deadline;
        int256 reputation;
    }

    /// @dev `escrow` is what the contract still holds for the job (zeroed once settled or reclaimed);
    /// `rewardLeft` is what Merkle-mode claims may still take (zeroed by a sweep); `claimClosesAt` is the
    /// last second a Merkle-mode job's rewards can be claimed, fixed at settle from the claimWindow of
    /// that moment, so a later setClaimWindow cannot shorten (or reopen) the window of a settled job
    /// (0 for other jobs: direct mode pays everyone at settle, and writing it would cost a fresh slot).
    /// rewardLeft and claimClosesAt share one slot, written together at settle and read together by claim and
    /// sweep. uint192 is enough: rewardLeft = minted + payout, where minted was just added to the SNO
    /// supply and payout comes out of escrow the contract already holds, so rewardLeft never exceeds
    /// totalSupply. That can only pass 2**192 (6.3e39 SNO at 18 decimals, 6e30 times the default genesis
    /// supply) through an absurd genesis supply or reward rate, and then settle reverts (SafeCast)
    /// instead of truncating.
    struct Job {
        address owner; // owner, openedAt and status share one slot: opening a job writes two slots
        uint64 openedAt;
        uint8 status;
        uint256 escrow;
        bytes32 proofRoot;
        bytes32 rewardRoot;
        uint192 rewardLeft;
        uint64 claimClosesAt;
    }

    SNOToken public immutable token;
    Staking public immutable staking;
    /// @notice Receives slashed stake and swept unclaimed rewards; zero burns them.
    address public treasury;
    /// @notice Seconds after a Merkle-mode settlement during which its rewards can be claimed; after that
    /// anyone may sweep the rest. Each job's closing time is fixed when it settles, so a change applies
    /// to later settlements only. Packed into treasury's slot.
    uint64 public claimWindow;
    /// @notice SNO minted per unit of work.
    uint256 public rewardPerWork;
    /// @notice Seconds after opening from which the owner may reclaim an unsettled job's escrow.
    uint64 public jobTimeout;
    uint256 public jobCount;

    mapping(uint256 jobId => Job) public jobs;
    mapping(address account => int256) public reputation;
    mapping(uint256 nonce => bool) public usedSlashNonce;
    mapping(uint256 jobId => mapping(address worker => bool)) public claimed;

    event JobOpened(uint256 indexed jobId, address indexed owner, uint256 escrow);
    event JobReclaimed(uint256 indexed jobId, address indexed owner, uint256 escrow);
    event JobSettled(uint256 indexed jobId, bytes32 proofRoot, bytes32 rewardRoot, uint256 payout, uint256 minted);
    event WorkerPaid(uint256 indexed jobId, address indexed worker, uint256 amount, int256 repDelta);
    event ReputationChanged(address indexed account, int256 delta, int256 newValue);
    event SlashExecuted(address indexed offender, uint256 taken, bytes32 evidence, uint256 nonce);
    event RewardPerWorkSet(uint256 oldValue, uint256 newValue);
    event TreasurySet(address oldValue, address newValue);
    event JobTimeoutSet(uint64 oldValue, uint64 newValue);
    event ClaimWindowSet(uint64 oldValue, uint64 newValue);
    event UnclaimedSwept(uint256 indexed jobId, uint256 amount, address recipient);

    error ZeroAddress();
    error ZeroAmount();
    error Expired(uint256 deadline);
    error StaleEpoch(uint64 signed, uint64 current);
    error JobNotOpen(uint256 jobId, uint8 status);
    error PayoutExceedsEscrow(uint256 payout, uint256 escrow);
    error SignersNotAscending(uint256 index);
    error NotValidatorSigner(address signer);
    error NotEnoughSignatures(uint256 have, uint256 need);
    error LengthMismatch();
    error BadWorkerCount(uint256 count, uint256 max);
    error TotalWorkMismatch(uint256 totalWork, uint256 sum);
    error AlreadyClaimed(uint256 jobId, address worker);
    error InvalidProof();
    error RewardExhausted(uint256 left, uint256 amount);
    error NotJobOwner(uint256 jobId, address caller);
    error JobNotExpired(uint256 jobId, uint256 reclaimableAt);
    error OffenderCannotSign();
    error SlashReplayed(uint256 nonce);
    error MissingEvidence();
    error PositiveSlashReputation(int256 delta);
    error BadJobTimeout(uint64 timeout);
    error TokenMismatch(address settlementToken, address stakingToken);
    error BadClaimWindow(uint64 window);
    error ClaimWindowClosed(uint256 jobId, uint256 closedAt);
    error ClaimWindowOpen(uint256 jobId, uint256 closesAt);
    error NotMerkleSettled(uint256 jobId);
    error NothingToSweep(uint256 jobId);

    constructor(
        SNOToken token_,
        Staking staking_,
        address admin,
        uint48 adminDelay,
        address treasury_,
        uint256 rewardPerWork_,
        uint64 jobTimeout_,
        uint64 claimWindow_
    ) AccessControlDefaultAdminRules(adminDelay, admin) {
        if (address(token_) == address(0) || address(staking_) == address(0)) revert ZeroAddress();
        // Stake and rewards must be the same token, or slashing would move a different asset than the
        // one escrowed and minted here.
        address stakingToken = address(staking_.token());
        if (stakingToken != address(token_)) revert TokenMismatch(address(token_), stakingToken);
        _checkJobTimeout(jobTimeout_);
        _checkClaimWindow(claimWindow_);
        token = token_;
        staking = staking_;
        treasury = treasury_;
        rewardPerWork = rewardPerWork_;
        jobTimeout = jobTimeout_;
        claimWindow = claimWindow_;
    }

    // ---------------------------------------------------------------- jobs

    /// @notice Opens a job escrowing `escrow` SNO from the caller (may be 0: reward-only job).
    function openJob(uint256 escrow) external returns (uint256 jobId) {
        return _openJob(escrow);
    }

    /// @notice openJob with an ERC-2612 permit; the permit is tried and a failure ignored (it may have
    /// been front-run), and tokens are only pulled from msg.sender.
    function openJobWithPermit(uint256 escrow, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
        returns (uint256 jobId)
    {
        try IERC20Permit(address(token)).permit(msg.sender, address(this), escrow, deadline, v, r, s) {} catch {}
        return _openJob(escrow);
    }

    function _openJob(uint256 escrow) private returns (uint256 jobId) {
        jobId = ++jobCount;
        Job storage job = jobs[jobId]; // fresh: only the non-zero fields are written
        job.owner = msg.sender;
        job.openedAt = uint64(block.timestamp);
        job.status = STATUS_OPEN;
        if (escrow != 0) job.escrow = escrow;
        emit JobOpened(jobId, msg.sender, escrow);
        if (escrow != 0) token.safeTransferFrom(msg.sender, address(this), escrow);
    }

    /// @notice Gives the escrow of a job nobody settled back to its owner, from openedAt + jobTimeout.
    function reclaim(uint256 jobId) external nonReentrant {
        Job storage job = jobs[jobId];
        if (job.status != STATUS_OPEN) revert JobNotOpen(jobId, job.status);
        if (msg.sender != job.owner) revert NotJobOwner(jobId, msg.sender);
        uint256 reclaimableAt = uint256(job.openedAt) + jobTimeout;
        if (block.timestamp < reclaimableAt) revert JobNotExpired(jobId, reclaimableAt);
        uint256 escrow = job.escrow;
        job.status = STATUS_RECLAIMED;
        job.escrow = 0;
        emit JobReclaimed(jobId, msg.sender, escrow);
        if (escrow != 0) token.safeTransfer(msg.sender, escrow);
    }

    // ---------------------------------------------------------------- settlement

    /// @notice Settles a job with a quorum of validator signatures over `s` (anyone may submit).
    /// @param signatures 65-byte signatures ordered by strictly ascending signer address.
    function settle(Settle calldata s, bytes[] calldata signatures) external nonReentrant {
        if (block.timestamp > s.deadline) revert Expired(s.deadline);
        _checkEpoch(s.epoch);
        Job storage job = jobs[s.jobId];
        if (job.status != STATUS_OPEN) revert JobNotOpen(s.jobId, job.status);
        uint256 escrow = job.escrow;
        if (s.payout > escrow) revert PayoutExceedsEscrow(s.payout, escrow);
        _checkSignatures(_hashTypedDataV4(_hashSettle(s)), signatures, address(0));

        // Effects: the job is closed before any token moves, so a replay or reentry sees JobNotOpen.
        job.status = STATUS_SETTLED;
        job.escrow = 0;
        job.proofRoot = s.proofRoot;
        address owner = job.owner;
        if (s.rewardRoot == bytes32(0)) {
            _settleDirect(s, owner, escrow);
        } else {
            _settleMerkle(s, job, owner, escrow);
        }
    }

    /// @dev Direct mode: worker i gets rewardPerWork * work[i] minted plus payout * work[i] / totalWork
    /// of the escrow; the owner gets escrow - sum(shares) (unpaid escrow and rounding dust).
    function _settleDirect(Settle calldata s, address owner, uint256 escrow) private {
        uint256 n = s.workers.length;
        if (n == 0 || n > MAX_DIRECT_WORKERS) revert BadWorkerCount(n, MAX_DIRECT_WORKERS);
        if (s.work.length != n || s.reputation.length != n) revert LengthMismatch();
        if (s.totalWork == 0) revert ZeroAmount();
        uint256 sum;
        for (uint256 i; i < n; ++i) {
            if (s.workers[i] == address(0)) revert ZeroAddress();
            sum += s.work[i];
        }
        if (sum != s.totalWork) revert TotalWorkMismatch(s.totalWork, sum);

        uint256 perWork = rewardPerWork;
        uint256 minted = perWork * sum;
        uint256 paid;
        emit JobSettled(s.jobId, s.proofRoot, bytes32(0), s.payout, minted);
        // Effects (reputation, events) for every worker first, then the token calls.
        for (uint256 i; i < n; ++i) {
            uint256 share = Math.mulDiv(s.payout, s.work[i], sum);
            paid += share;
            address w = s.workers[i];
            emit WorkerPaid(s.jobId, w, perWork * s.work[i] + share, s.reputation[i]);
            _addReputation(w, s.reputation[i]);
        }
        for (uint256 i; i < n; ++i) {
            address w = s.workers[i];
            uint256 reward = perWork * s.work[i];
            if (reward != 0) token.mint(w, reward);
            uint256 share = Math.mulDiv(s.payout, s.work[i], sum);
            if (share != 0) token.safeTransfer(w, share);
        }
        uint256 refund = escrow - paid;
        if (refund != 0) token.safeTransfer(owner, refund);
    }

    /// @dev Merkle mode: mints rewardPerWork * totalWork to this contract, keeps `payout` of the escrow
    /// for the claims and refunds the rest to the owner. Starts the claim window.
    function _settleMerkle(Settle calldata s, Job storage job, address owner, uint256 escrow) private {
        if (s.workers.length != 0 || s.work.length != 0 || s.reputation.length != 0) revert LengthMismatch();
        if (s.totalWork == 0) revert ZeroAmount();
        uint256 minted = rewardPerWork * s.totalWork;
        job.rewardRoot = s.rewardRoot;
        job.rewardLeft = SafeCast.toUint192(minted + s.payout); // see Job: cannot exceed totalSupply
        job.claimClosesAt = uint64(block.timestamp) + claimWindow;
        emit JobSettled(s.jobId, s.proofRoot, s.rewardRoot, s.payout, minted);
        if (minted != 0) token.mint(address(this), minted);
        uint256 refund = escrow - s.payout;
        if (refund != 0) token.safeTransfer(owner, refund);
    }

    /// @notice Pays a Merkle-mode reward to the worker its leaf names (whoever submits the proof).
    /// Leaf = keccak256(bytes.concat(keccak256(abi.encode(jobId, worker, amount, repDelta)))), the
    /// OpenZeppelin StandardMerkleTree convention; one leaf per worker per job. Open until the
    /// job's claimClosesAt (inclusive).
    function claim(uint256 jobId, address worker, uint256 amount, int256 repDelta, bytes32[] calldata proof)
        external
        nonReentrant
    {
        Job storage job = jobs[jobId];
        bytes32 root = job.rewardRoot; // zero unless settled in Merkle mode, and no proof leads to zero
        if (root == bytes32(0)) revert InvalidProof();
        uint256 closedAt = job.claimClosesAt;
        if (block.timestamp > closedAt) revert ClaimWindowClosed(jobId, closedAt);
        if (claimed[jobId][worker]) revert AlreadyClaimed(jobId, worker);
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(jobId, worker, amount, repDelta))));
        if (!MerkleProof.verifyCalldata(proof, root, leaf)) revert InvalidProof();
        uint256 left = job.rewardLeft;
        if (amount > left) revert RewardExhausted(left, amount);
        claimed[jobId][worker] = true;
        job.rewardLeft = uint192(left - amount); // left - amount <= left, which fits
        emit WorkerPaid(jobId, worker, amount, repDelta);
        _addReputation(worker, repDelta);
        if (amount != 0) token.safeTransfer(worker, amount);
    }

    /// @notice Once a Merkle-mode job's claim window has closed, sends whatever its claims left to the
    /// treasury, or burns it when the treasury is zero. Anyone may call it; it works once per job (later
    /// calls find nothing left), and claims stay closed afterwards.
    function sweepUnclaimed(uint256 jobId) external nonReentrant returns (uint256 amount) {
        Job storage job = jobs[jobId];
        if (job.rewardRoot == bytes32(0)) revert NotMerkleSettled(jobId);
        uint256 closesAt = job.claimClosesAt;
        if (block.timestamp <= closesAt) revert ClaimWindowOpen(jobId, closesAt);
        amount = job.rewardLeft;
        if (amount == 0) revert NothingToSweep(jobId);
        job.rewardLeft = 0;
        address recipient = treasury;
        emit UnclaimedSwept(jobId, amount, recipient);
        if (recipient == address(0)) token.burn(amount);
        else token.safeTransfer(recipient, amount);
    }

    // ---------------------------------------------------------------- slashing

    /// @notice Slashes a staked account with a quorum of validator signatures over `s`. The offender's
    /// own signature is rejected, each nonce works once, and the taken stake goes to the treasury
    /// (burnt when the treasury is zero). amount == 0 is a reputation-only penalty.
    function slash(Slash calldata s, bytes[] calldata signatures) external nonReentrant returns (uint256 taken) {
        if (block.timestamp > s.deadline) revert Expired(s.deadline);
        _checkEpoch(s.epoch);
        if (s.offender == address(0)) revert ZeroAddress();
        if (s.evidence == bytes32(0)) revert MissingEvidence();
        if (usedSlashNonce[s.nonce]) revert SlashReplayed(s.nonce);
        if (s.reputation > 0) revert PositiveSlashReputation(s.reputation);
        _checkSignatures(_hashTypedDataV4(_hashSlash(s)), signatures, s.offender);

        usedSlashNonce[s.nonce] = true;
        _addReputation(s.offender, s.reputation);
        if (s.amount != 0) taken = staking.slash(s.offender, s.amount, treasury);
        emit SlashExecuted(s.offender, taken, s.evidence, s.nonce);
    }

    // ---------------------------------------------------------------- signatures

    function _checkEpoch(uint64 signed) private view {
        uint64 current = staking.epoch();
        if (signed != current) revert StaleEpoch(signed, current);
    }

    /// @dev Strictly ascending signers rule out duplicates without a seen-set (Safe's GS026 check);
    /// ECDSA.recover rejects malleable (high-s) signatures and never returns address(0).
    function _checkSignatures(bytes32 digest, bytes[] calldata signatures, address offender) private view {
        uint256 need = staking.quorum();
        uint256 have = signatures.length;
        if (have < need) revert NotEnoughSignatures(have, need);
        address previous = address(0);
        for (uint256 i; i < have; ++i) {
            address signer = ECDSA.recover(digest, signatures[i]);
            if (signer <= previous) revert SignersNotAscending(i);
            previous = signer;
            if (signer == offender) revert OffenderCannotSign();
            if (!staking.isValidator(signer)) revert NotValidatorSigner(signer);
        }
    }

    /// @dev EIP-712 encodes an array of atomic values as keccak256 of its 32-byte-padded elements,
    /// which is exactly keccak256(abi.encodePacked(array)) for address[], uint256[] and int256[].
    function _hashSettle(Settle calldata s) private pure returns (bytes32) {
        return keccak256(
            bytes.concat(
                abi.encode(SETTLE_TYPEHASH, s.jobId, s.epoch, s.deadline, s.proofRoot, s.payout),
                abi.encode(
                    keccak256(abi.encodePacked(s.workers)),
                    keccak256(abi.encodePacked(s.work)),
                    keccak256(abi.encodePacked(s.reputation)),
                    s.rewardRoot,
                    s.totalWork
                )
            )
        );
    }

    function _hashSlash(Slash calldata s) private pure returns (bytes32) {
        return keccak256(
            abi.encode(SLASH_TYPEHASH, s.offender, s.amount, s.evidence, s.nonce, s.epoch, s.deadline, s.reputation)
        );
    }

    function _addReputation(address account, int256 delta) private {
        if (delta == 0) return;
        int256 value = reputation[account] + delta;
        reputation[account] = value;
        emit ReputationChanged(account, delta, value);
    }

    // ---------------------------------------------------------------- views

    /// @notice The EIP-712 digest validators sign for `s` (for clients to check their encoding).
    function settleDigest(Settle calldata s) external view returns (bytes32) {
        return _hashTypedDataV4(_hashSettle(s));
    }

    function slashDigest(Slash calldata s) external view returns (bytes32) {
        return _hashTypedDataV4(_hashSlash(s));
    }

    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    // ---------------------------------------------------------------- admin

    function setRewardPerWork(uint256 newValue) external onlyRole(DEFAULT_ADMIN_ROLE) {
        emit RewardPerWorkSet(rewardPerWork, newValue);
        rewardPerWork = newValue;
    }

    function setTreasury(address newTreasury) external onlyRole(DEFAULT_ADMIN_ROLE) {
        emit TreasurySet(treasury, newTreasury);
        treasury = newTreasury;
    }

    function setJobTimeout(uint64 newTimeout) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _checkJobTimeout(newTimeout);
        emit JobTimeoutSet(jobTimeout, newTimeout);
        jobTimeout = newTimeout;
    }

    function _checkJobTimeout(uint64 timeout) private pure {
        if (timeout < MIN_JOB_TIMEOUT || timeout > MAX_JOB_TIMEOUT) revert BadJobTimeout(timeout);
    }

    function setClaimWindow(uint64 newWindow) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _checkClaimWindow(newWindow);
        emit ClaimWindowSet(claimWindow, newWindow);
        claimWindow = newWindow;
    }

    function _checkClaimWindow(uint64 window) private pure {
        if (window < MIN_CLAIM_WINDOW || window > MAX_CLAIM_WINDOW) revert BadClaimWindow(window);
    }
}
