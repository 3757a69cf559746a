"""ALMoST step 2: reward-model-guided self-play (RMSP), the SFT demonstrations (Section 2.2).

`turns` holds the algorithm as pure functions (role prompts, stop strings, degenerate turns, best-of-N,
and what a role's or the RM's replica does with a batch), `stage` the `rmsp` stage (replica sets per role,
the streaming self-play, its outputs), `vs_self_play` RMSP against plain self-play (Table 5).
"""
