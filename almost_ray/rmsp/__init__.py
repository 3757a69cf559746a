"""ALMoST step 2: reward-model-guided self-play (RMSP), the SFT demonstrations (Section 2.2).

`turns` holds the algorithm as pure functions (role prompts, stop strings, degenerate turns,
best-of-N), `replicas` the Ray Data actor classes (role generators, the RM scorer), `stage` the
streaming pipeline and its outputs, `compare` the RMSP-vs-self-play report (Table 5).
"""
