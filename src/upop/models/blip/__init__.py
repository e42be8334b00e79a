"""BLIP (Li et al., ICML 2022): the NLVR, retrieval, captioning and VQA models built from HF transformers BLIP parts,
the released checkpoints' key maps, and HF BLIP directories."""
