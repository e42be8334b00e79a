"""UPop inside the training stacks people already use: a callback for the HF ``Trainer``
(``upop.integrations.transformers``) and one for PyTorch Lightning (``upop.integrations.lightning``).

A search needs two things of a training loop: the task loss's backward (which gives the masks their gradients) and
``Pruner.step()`` after every optimizer step. The callbacks do both without touching the user's loss: the masks are
not optimised, and the sparsity loss's L1 weights do not change which elements are chosen, so it is not added."""
