"""Post-training with trl: SFT and preference data, the SFT model, the reward model, the aligned policy."""
