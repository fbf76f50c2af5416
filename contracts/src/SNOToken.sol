// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Burnable} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Burnable.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";

/// @title SNO, the TensorLink work token
/// @notice A fixed genesis supply plus whatever the settlement contract mints as work rewards. The
/// minter is bound once, so after deployment no key can print tokens outside settlement.
/// @dev Permit (ERC-2612) lets staking and job escrow take tokens in one transaction; Burnable lets
/// the staking contract burn slashed stake when no treasury is set.
contract SNOToken is ERC20, ERC20Permit, ERC20Burnable {
    /// @notice The account that may bind the minter (the deployment script's key).
    address public immutable deployer;
    /// @notice The settlement contract; zero until bound.
    address public minter;

    /// @notice Emitted once, when `bindMinter` succeeds.
    event MinterBound(address indexed minter);

    error NotDeployer();
    error MinterAlreadyBound();
    error ZeroAddress();
    error NotMinter(address caller);

    /// @param genesisHolder receives the genesis supply, the only SNO not minted by settlement.
    /// @param genesisSupply amount minted at deployment (18 decimals).
    constructor(address genesisHolder, uint256 genesisSupply) ERC20("TensorLink SNO", "SNO") ERC20Permit("TensorLink SNO") {
        if (genesisHolder == address(0)) revert ZeroAddress();
        deployer = msg.sender;
        _mint(genesisHolder, genesisSupply);
    }

    /// @notice Binds the settlement contract as the only minter. Once only, so a leaked deployer key
    /// cannot redirect minting later.
    function bindMinter(address m) external {
        if (msg.sender != deployer) revert NotDeployer();
        if (minter != address(0)) revert MinterAlreadyBound();
        if (m == address(0)) revert ZeroAddress();
        minter = m;
        emit MinterBound(m);
    }

    /// @notice Mints work rewards; only the bound settlement contract may call it (before binding,
    /// minter is zero, which no caller can be).
    function mint(address to, uint256 amount) external {
        if (msg.sender != minter) revert NotMinter(msg.sender);
        _mint(to, amount);
    }
}
