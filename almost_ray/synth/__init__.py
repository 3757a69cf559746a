"""ALMoST step 1 (Section 2.1, Appendix C): synthetic comparisons on Ray Data.

`queries` mines initial queries (Self-Instruct), `ladder` answers them with every generator rung,
`filters` binarizes and post-validates (Heuristic Filter, As-is RM agreement), and `compare` is the
stage that ties ladder and filters together into `comparisons.jsonl`.
"""
