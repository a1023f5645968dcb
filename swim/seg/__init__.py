"""Referring video segmentation as an optional plug-in of SWIM training (issue 11; docs/segmentation.md).

A Sa2VA-style head — SAM-2 from transformers prompted by the last-layer state of the tagged word or of an added
`[SEG]` token — with the MBA paper's Mask-Biased Attention (three named semantics: the paper's text, the
authors' released code, and a fixed version), its text–mask contrastive and boundary losses, and SWIM's own
supervised attention map as an MBA prior (our extension). Off unless a recipe sets `seg_head: true`; the LLM
checkpoint stays a stock Qwen folder and the head saves beside it in `seg_head/`.

- `config.SegConfig`: the recipe keys;  `head.SegHead`: SAM-2 + prompt projection + MBA;  `mba`: MBA itself
- `losses`: BCE/Dice, TMC, boundary;  `objective`: pairs, the SWIM attention gate, the loss terms
- `data`: `SegDataset`, `collate_seg`, `SegCollator`;  `probe.LastHiddenProbe`: the prompt's hidden state
- `trainer.SegPlugin`: what `SwimSFTTrainer` does when the head is on;  `sam2`: tiny SAM-2 checkpoints, frames
"""
