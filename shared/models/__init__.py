"""Model code every service and tool shares: the default model, the reward model, text encoding, loading."""
