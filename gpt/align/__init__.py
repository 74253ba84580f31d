"""Alignment after pretraining: the chat template, supervised fine-tuning (SFT) and DPO."""
