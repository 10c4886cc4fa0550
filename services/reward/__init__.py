"""Reward model: learns r(x, y) from users' ratings (InstructGPT's RM) and scores responses over gRPC."""
