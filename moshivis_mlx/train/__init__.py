"""moshivis-train: fine-tuning MoshiVis' adapters (the gated cross-attention and the image
prefix) on a frozen backbone, with Kyutai's loss, in MLX. See docs/TRAIN.md."""
