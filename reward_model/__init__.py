"""reward_model."""
