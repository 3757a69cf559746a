"""Training on Ray Train with FSDP2: the reward model and supervised finetuning (see docs/training.md).

`loop.py` is the one training loop; `reward.py` and `sft.py` are its tasks and the `train-rm` /
`train-sft` stages; `losses.py` and `data.py` hold the pure pieces they share.
"""
