"""ALMoST step 3: PPO from synthetic feedback (RLSF). See `docs/ppo.md`."""
